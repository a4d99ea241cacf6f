"""The demo's generated collection as a cache table: every image encoded by the small ImageBind
preset (random weights, as the demo without a checkpoint), with its caption."""

from __future__ import annotations

import tarfile
from pathlib import Path

import lancedb
import pyarrow as pa
from tables import image_rows

from cachebind.config import EncoderConfig, StoreConfig, WeightsConfig
from cachebind.demo.data import write_images
from cachebind.encode import Encoder


def read_shards(shards: list[Path]) -> tuple[list[str], list[str], list[bytes]]:
    keys, captions, images = [], [], []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    keys.append(member.name[:-4])
                    images.append(data)
                elif member.name.endswith(".txt"):
                    captions.append(data.decode())
    return keys, captions, images


def demo_cache(root: Path, count: int = 240) -> StoreConfig:
    keys, captions, images = read_shards(write_images(root / "images", count=count))
    encoder = Encoder.from_config(
        EncoderConfig(preset="small", device="cpu"), WeightsConfig(dir=root / "no-weights")
    )
    rows = image_rows(encoder.embed("image", images), dtype="float32")
    rows = rows.set_column(rows.schema.get_field_index("key"), "key", pa.array(keys))
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", pa.array(captions))
    lancedb.connect(str(root / "db")).create_table("images", rows, mode="overwrite")
    return StoreConfig(uri=str(root / "db"), table="images", vector_dtype="float32")
