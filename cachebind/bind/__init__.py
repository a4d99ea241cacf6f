"""Bind network (eq. 1): rmsnorm (today's released 7B) and layernorm (7B-beta, "legacy bridge");
LLaVA-1.5's projector (patch tokens -> visual tokens)."""

from cachebind.bind.network import BindNetwork, RMSNorm, Variant, detect_variant
from cachebind.bind.projector import LlavaProjector

__all__ = ["BindNetwork", "LlavaProjector", "RMSNorm", "Variant", "detect_variant"]
