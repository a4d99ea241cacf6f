"""Bind network (eq. 1): rmsnorm (today's released 7B) and layernorm (7B-beta, "legacy bridge")."""

from cachebind.bind.network import BindNetwork, RMSNorm, Variant, detect_variant

__all__ = ["BindNetwork", "RMSNorm", "Variant", "detect_variant"]
