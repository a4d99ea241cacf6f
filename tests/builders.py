"""A small real cache for the tests and the serving benchmark: a LanceDB table, a FAISS index.

Rows carry random unit vectors, generated JPEG thumbnails and captions, so every part of the
service (search, filters, thumbnails, enhance) runs on real LanceDB and FAISS objects. Test code,
not product code: the package never imports it (``benchmarks/bench_serve.py`` puts ``tests/``
on its path).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from PIL import Image

from cachebind.config import EmbedConfig, EncoderConfig, Settings, StoreConfig
from cachebind.demo.data import COLOURS
from cachebind.published.manifest import Manifest, TableRef, ids_checksum
from cachebind.serve.runtime import IndexSnapshot
from cachebind.store import CacheTable, connect, images_schema, row_id

# Captions cycle through these five of the demo's colours ("a red dog", "a green dog", ...).
PALETTE = ("red", "green", "blue", "yellow", "purple")
SUBJECTS = ["dog", "cat", "boat", "tree", "house", "bird", "car", "flower"]


@dataclass
class DemoCache:
    store: StoreConfig
    dim: int
    rows: int


def thumbnail_jpeg(colour: tuple[int, int, int], size: int = 64, seed: int = 0) -> bytes:
    """A small generated picture: a coloured square with a lighter disc."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), colour)
    pixels = np.asarray(img).copy()
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
    pixels[disc] = np.minimum(255, pixels[disc].astype(int) + 80)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def demo_rows(
    start: int, count: int, dim: int, seed: int, encoder: dict[str, Any] | None = None
) -> pa.Table:
    """``count`` rows of the images schema; row ``i`` is key ``sample-{i:06d}``. ``encoder``:
    the identity the table records (as the embedding job writes it); none by default."""
    rng = np.random.default_rng(seed + start)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = PALETTE
    keys, captions, widths, heights, thumbs, shards = [], [], [], [], [], []
    for j in range(count):
        i = start + j
        colour = names[i % len(names)]
        subject = SUBJECTS[(i // len(names)) % len(SUBJECTS)]
        keys.append(f"sample-{i:06d}")
        captions.append(f"a {colour} {subject}")
        widths.append(int(rng.integers(32, 400)))
        heights.append(int(rng.integers(32, 400)))
        shards.append(f"{i // 100:05d}")
        # Every tenth row has no thumbnail, as a cache built with thumbnails off would.
        thumbs.append(None if i % 10 == 9 else thumbnail_jpeg(COLOURS[colour], seed=i))
    metadata = {"encoder": encoder or "fixture"}
    if encoder:
        metadata["preprocess_version"] = encoder.get("preprocess_version")
    schema = images_schema(dtype="float16", dim=dim, metadata=metadata)
    return pa.table(
        {
            "id": pa.array([row_id(k) for k in keys], pa.int64()),
            "key": keys,
            "caption": captions,
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "shard": shards,
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.float16).ravel(), pa.float16()), dim
            ),
            "thumbnail": pa.array(thumbs, pa.binary()),
        },
        schema=schema,
    )


def build_demo_cache(
    root: Path, rows: int = 200, dim: int = 64, seed: int = 0, encoder: dict[str, Any] | None = None
) -> DemoCache:
    """Create (or overwrite) the LanceDB ``images`` table under ``root`` with ``rows``
    generated rows, recording ``encoder`` as the encoder that embedded them."""
    store = StoreConfig(uri=str(Path(root) / "lancedb"), table="images")
    db = connect(store)
    db.create_table(store.table, demo_rows(0, rows, dim, seed, encoder), mode="overwrite")
    return DemoCache(store=store, dim=dim, rows=rows)


def append_rows(cache: DemoCache, count: int, seed: int = 0) -> int:
    """Append ``count`` new rows (a new table version, as an embedding job run makes)."""
    table = connect(cache.store).open_table(cache.store.table)
    table.add(demo_rows(cache.rows, count, cache.dim, seed))
    cache.rows += count
    return int(table.version)


class FlatIndex:
    """An exact FAISS inner-product index over a table version (``IndexIDMap2`` of a Flat),
    with the ``LoadedIndex`` shape the runtime uses."""

    def __init__(self, table: CacheTable) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(table.dim))
        for ids, vectors in table.iter_vectors():
            self.index.add_with_ids(np.ascontiguousarray(vectors), ids)
        self.version = f"flat-v{table.version}"
        ids = faiss.vector_to_array(self.index.id_map)
        self.manifest = Manifest(
            index_key="Flat",
            dim=table.dim,
            table=TableRef(table.dataset.uri, int(table.version), len(ids), ids_checksum(ids)),
            version=self.version,
            ntotal=int(self.index.ntotal),
        )

    def search(
        self, queries: np.ndarray, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        # Exact: every modality is searched alike.
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores.astype(np.float32), ids.astype(np.int64)


class TableFlatLoader:
    """Index versions that follow the table: each new table version gets an exact index.

    ``current_version`` is cheap (the table's latest version number), as the reload loop needs.
    """

    def __init__(self, store: StoreConfig) -> None:
        self.store = store

    def current_version(self) -> str | None:
        return f"flat-v{CacheTable.open(self.store).version}"

    def load(self) -> IndexSnapshot:
        table = CacheTable.open(self.store)
        index = FlatIndex(table)
        return IndexSnapshot.of(index, table, index.version, index.manifest)


@dataclass
class ServiceSettings:
    """Settings with fresh user/admin keys, for a server over a fixture cache."""

    settings: Any  # cachebind.config.Settings
    user_key: str
    admin_key: str


def service_settings(root: Path, cache: DemoCache, **serve: Any) -> ServiceSettings:
    """Settings pointing at ``cache`` with a tiny encoder and key files under ``root``."""
    from cachebind.config import Settings
    from cachebind.serve.auth import generate_key, write_key_file

    user, admin = generate_key(), generate_key()
    keys = Path(root) / "keys"
    settings = Settings(
        weights={"dir": str(Path(root) / "weights")},
        encoder={"preset": "tiny", "device": "cpu", "dtype": "float32"},
        store=cache.store.model_dump(),
        index={"dir": str(Path(root) / "index")},
        serve={
            "api_keys_file": str(write_key_file(keys / "users.txt", [user])),
            "admin_keys_file": str(write_key_file(keys / "admins.txt", [admin])),
            **serve,
        },
    )
    return ServiceSettings(settings, user, admin)


def tiny_runtime(settings: Any, loader: Any, generator: Any = None) -> Any:
    """A Runtime with the tiny random-init encoder over the loader's current snapshot."""
    from cachebind.encode import Encoder
    from cachebind.serve.runtime import Runtime

    encoder = Encoder.from_config(settings.encoder, settings.weights)
    return Runtime(
        encoder,
        snapshot=loader.load(),
        loader=loader,
        generator=generator,
        cache_config=settings.cache,
    )


def embed_settings(db: Path, table: str = "images", **embed: Any) -> Settings:
    """Settings of a small embedding job: the tiny preset, a table in ``db``, batch 8."""
    return Settings(
        encoder=EncoderConfig(preset="tiny"),
        store=StoreConfig(uri=str(db), table=table),
        embed=EmbedConfig(**{"batch_size": 8, **embed}),
    )
