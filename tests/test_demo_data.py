"""The demo's generated collection is in img2dataset's webdataset layout and deterministic."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import av
import pyarrow.parquet as pq
from PIL import Image

from cachebind.demo.data import write_collection, write_images


def test_shards_hold_jpg_txt_json_per_key(tmp_path: Path) -> None:
    shards = write_images(tmp_path, count=25, per_shard=10)
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert len(names) == 30
        key = names[0].split(".")[0]
        assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(names)
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        caption = tar.extractfile(f"{key}.txt").read().decode()
        image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
    assert meta["key"] == key and meta["caption"] == caption and meta["status"] == "success"
    assert (meta["width"], meta["height"]) == image.size
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 10
    assert json.loads((tmp_path / "00002_stats.json").read_text())["count"] == 5


def test_collection_is_deterministic(tmp_path: Path) -> None:
    a = write_collection(tmp_path / "a", count=12)
    b = write_collection(tmp_path / "b", count=12)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(p) for p in a.shards] == [digest(p) for p in b.shards]
    assert digest(a.audio["chirp"]) == digest(b.audio["chirp"])


def test_audio_and_video_decode(tmp_path: Path) -> None:
    c = write_collection(tmp_path, count=5)
    with av.open(str(c.audio["low_tone"])) as f:
        stream = f.streams.audio[0]
        assert stream.rate == 16_000
        samples = sum(frame.samples for frame in f.decode(stream))
    assert samples == 3 * 16_000
    with av.open(str(c.video)) as f:
        frames = list(f.decode(video=0))
    assert len(frames) == 40 and frames[0].width == 240
