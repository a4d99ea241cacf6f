"""Search by an extra encoder (CLIP ViT-L/14-336, DINOv2): its own vector of a sent image
against a published index of its ``vector_<name>`` column (``serve.extra_indexes``).

ImageBind's index and cache blend are the service's main path; these indexes stand beside it,
each with its encoder (``embed.extra_encoders[name]``, the directory the table was embedded
with) and a table handle that reads its column, so a version built from another column is
refused at load (``IndexMismatchError``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachebind.config import Settings
from cachebind.device import resolve_device
from cachebind.errors import WeightsError


@dataclass
class ExtraSearch:
    """One extra encoder with the index of its column, at one table version."""

    name: str
    encoder: Any  # cachebind.encode.extra.ExtraEncoder
    table: Any  # cachebind.store.CacheTable reading vector_<name>
    index: Any  # cachebind.published.load.LoadedIndex
    version: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dim(self) -> int:
        return int(self.encoder.shape.out_dim)

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """The encoder's L2-normalised vector of one preprocessed image: float32 [1, dim]."""
        with self.lock:  # one forward at a time: the model is shared by every request
            vectors, _ = self.encoder.encode(pixels[None])
        return np.ascontiguousarray(vectors.numpy(), dtype=np.float32)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(query, k)
        return np.asarray(scores[0]), np.asarray(ids[0])


def load_extra_searches(settings: Settings) -> dict[str, ExtraSearch]:
    """Each ``serve.extra_indexes`` entry's encoder, table handle and CURRENT index."""
    from cachebind.encode.extra import ExtraEncoder
    from cachebind.published.load import load_current
    from cachebind.store import CacheTable

    out: dict[str, ExtraSearch] = {}
    for name, index_dir in sorted(settings.serve.extra_indexes.items()):
        checkpoint = settings.embed.extra_encoders.get(name)
        if checkpoint is None:
            raise WeightsError(
                f"serve.extra_indexes names {name!r} but embed.extra_encoders has no {name} "
                "checkpoint directory to encode its queries with"
            )
        device = str(resolve_device(settings.encoder.device))
        encoder = ExtraEncoder.load(name, Path(checkpoint), device)
        table = CacheTable.open(settings.store, column=f"vector_{name}")
        loaded = load_current(Path(index_dir), table, use_gpu=settings.index.use_gpu)
        out[name] = ExtraSearch(name, encoder, table, loaded, loaded.version)
    return out
