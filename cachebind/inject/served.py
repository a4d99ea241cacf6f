"""The LLM a server runs, as ``llm`` configures it: LLaMA with the ImageBind-LLM adapter, or in
tokens mode LLaVA-1.5 or SPHINX's mixed embedding over the cache's encoders."""

from __future__ import annotations

from typing import Any

from cachebind.config import Settings
from cachebind.inject.generate import Generator, load_generator
from cachebind.inject.llava_serve import TokensGenerator, load_llava_generator


def load_served_llm(
    settings: Settings, trunk: Any = None, *, seed: int | None = None
) -> Generator | TokensGenerator:
    """The LLM that ``llm.mode`` names; ``trunk`` is the served ImageBind encoder (a mixed
    projector over ImageBind's tokens runs its vision trunk)."""
    llm = settings.llm
    if llm.mode == "llava" and llm.mixed_projector is not None:
        from cachebind.inject.mixed_serve import load_mixed_generator

        extra_dirs = {str(name): path for name, path in settings.embed.extra_encoders.items()}
        return load_mixed_generator(llm, extra_dirs, trunk, seed=seed)
    if llm.mode == "llava":
        return load_llava_generator(llm, seed=seed)
    return load_generator(llm, seed=seed)
