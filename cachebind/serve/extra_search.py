"""Search by an extra encoder (CLIP ViT-L/14-336, DINOv2): its own vector of a sent image
against a published index of its ``vector_<name>`` column (``serve.extra_indexes``).

ImageBind's index and cache blend are the service's main path; these indexes stand beside it,
each with its encoder (``embed.extra_encoders[name]``, the directory the table was embedded
with) and a table handle that reads its column, so a version built from another column is
refused at load (``IndexMismatchError``). A newly published version is swapped in by the same
reload as the main index (the poll loop, ``POST /v1/admin/reload``), the old one kept when the
new one does not load.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachebind.config import Settings, StoreConfig
from cachebind.device import resolve_device
from cachebind.errors import WeightsError
from cachebind.published.layout import current_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtraVersion:
    """One published version of an extra encoder's index with the table handle it was built
    from (a request reads both from one of these, whatever a reload swaps in meanwhile)."""

    table: Any  # cachebind.store.CacheTable reading vector_<name>
    index: Any  # cachebind.published.load.LoadedIndex
    version: str | None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(query, k)
        return np.asarray(scores[0]), np.asarray(ids[0])


@dataclass
class ExtraSearch:
    """One extra encoder with the published index of its column: the current version, and
    ``poll`` to swap in a newly published one (as the main index reloads)."""

    name: str
    encoder: Any  # cachebind.encode.extra.ExtraEncoder
    index_dir: Path
    store: StoreConfig
    use_gpu: str
    current: ExtraVersion
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dim(self) -> int:
        return int(self.encoder.shape.out_dim)

    @property
    def version(self) -> str | None:
        return self.current.version

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        """The encoder's L2-normalised vector of one preprocessed image: float32 [1, dim]."""
        with self.lock:  # one forward at a time: the model is shared by every request
            vectors, _ = self.encoder.encode(pixels[None])
        return np.ascontiguousarray(vectors.numpy(), dtype=np.float32)

    def poll(self, force: bool = False) -> bool:
        """Load the CURRENT version if it is not the one served (or ``force``), against the
        table's latest version, and swap it in; True when swapped. A version that does not
        load (half written, built from another table or column) raises, and the old one stays."""
        published = current_version(self.index_dir)
        if published is None or (published == self.current.version and not force):
            return False
        self.current = open_version(self.name, self.index_dir, self.store, self.use_gpu, published)
        log.info("serving %s index version %s", self.name, published)
        return True


def open_version(
    name: str, index_dir: Path, store: StoreConfig, use_gpu: str, version: str
) -> ExtraVersion:
    from cachebind.published.load import load_version
    from cachebind.store import CacheTable

    table = CacheTable.open(store, column=f"vector_{name}")
    loaded = load_version(index_dir, version, table, use_gpu=use_gpu)
    return ExtraVersion(table, loaded, loaded.version)


def load_extra_searches(settings: Settings) -> dict[str, ExtraSearch]:
    """Each ``serve.extra_indexes`` entry's encoder, table handle and CURRENT index."""
    from cachebind.encode.extra import ExtraEncoder

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
        version = current_version(Path(index_dir))
        if version is None:
            raise FileNotFoundError(f"no published index in {index_dir}: run `cachebind index`")
        use_gpu = settings.index.use_gpu
        current = open_version(name, Path(index_dir), settings.store, use_gpu, version)
        out[name] = ExtraSearch(name, encoder, Path(index_dir), settings.store, use_gpu, current)
    return out
