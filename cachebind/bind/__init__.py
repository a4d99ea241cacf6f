"""Bind network (eq. 1): layernorm (released 7B, "legacy bridge") and rmsnorm variants."""

from cachebind.bind.network import BindNetwork, RMSNorm, Variant, detect_variant

__all__ = ["BindNetwork", "RMSNorm", "Variant", "detect_variant"]
