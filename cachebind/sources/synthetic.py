"""Small generated data sets in every source layout, with bad samples of every class.

Used by the tests, the benchmark and demos: real JPEG/PNG bytes written in the same layouts that
img2dataset, folders, parquet files and the CC3M TSV have, so the readers meet what they will meet.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A small image with seed-dependent content (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    pixels = base + 60 * np.sin(xx[..., None] / (3 + seed % 7)) + rng.normal(0, 20, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes that claim ``width x height`` pixels: a decompression bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bad_samples() -> dict[str, bytes]:
    """One sample of each bad class, named by the reason the job must record."""
    good = image_bytes(123, (120, 90))
    return {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "decompression_bomb": bomb_png(),
        "undecodable": b"this is a text file, not an image" * 4,
    }


def write_webdataset(
    out_dir: Path, n: int, *, per_shard: int = 10, bad: dict[str, bytes] | None = None
) -> list[str]:
    """img2dataset-style tar shards ``00000.tar`` …: ``<key>.jpg``, ``.txt``, ``.json`` members.

    Keys are img2dataset keys (shard then position, 9 digits). ``bad`` samples are appended to
    the last shard under keys ``bad_<reason>``. Returns the keys of the good samples.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    members: list[list[tuple[str, bytes]]] = []
    for i in range(n):
        shard, pos = divmod(i, per_shard)
        key = f"{shard * 10_000 + pos:09d}"
        keys.append(key)
        meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}
        if shard == len(members):
            members.append([])
        members[shard] += [
            (f"{key}.jpg", image_bytes(i)),
            (f"{key}.txt", f"a picture number {i}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    for reason, data in (bad or {}).items():
        members[-1] += [(f"bad_{reason}.jpg", data), (f"bad_{reason}.txt", reason.encode())]
    for shard, files in enumerate(members):
        with tarfile.open(out_dir / f"{shard:05d}.tar", "w") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


def write_folder(out_dir: Path, n: int, *, captions: bool = True, subdirs: int = 1) -> list[str]:
    """``x.jpg`` (+ ``x.txt``) files spread over ``subdirs`` sub-folders; returns the keys."""
    keys = []
    for i in range(n):
        sub = out_dir / f"d{i % subdirs}" if subdirs > 1 else out_dir
        sub.mkdir(parents=True, exist_ok=True)
        name = f"img{i:04d}"
        (sub / f"{name}.jpg").write_bytes(image_bytes(i))
        if captions:
            (sub / f"{name}.txt").write_text(f"caption {i}")
        keys.append(str((sub / name).relative_to(out_dir)))
    return keys


def write_parquet(
    path: Path, n: int, *, image_column: str = "jpg", row_group_size: int = 10
) -> list[str]:
    """img2dataset's parquet layout: key, url, caption, status, width, height and image bytes."""
    keys = [f"{i:09d}" for i in range(n)]
    table = pa.table(
        {
            "key": keys,
            "url": [f"http://example.com/{k}.jpg" for k in keys],
            "caption": [f"parquet caption {i}" for i in range(n)],
            "status": ["success"] * n,
            "width": [64] * n,
            "height": [48] * n,
            image_column: [image_bytes(i) for i in range(n)],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return keys


def write_cc3m(
    tsv: Path, images: Path, n: int, *, missing: tuple[int, ...] = (), samples_per_shard: int = 10
) -> list[str]:
    """A CC3M-style TSV (caption<TAB>url, no header) and img2dataset ``files`` output for it.

    Rows listed in ``missing`` have no downloaded image. Returns the keys of downloaded rows.
    """
    keys = []
    lines = []
    for i in range(n):
        shard, pos = divmod(i, samples_per_shard)
        key = f"{shard * 10_000 + pos:09d}"
        lines.append(f"cc3m caption {i}\thttp://example.com/cc3m/{i}.jpg\n")
        if i in missing:
            continue
        folder = images / f"{shard:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(image_bytes(i))
        keys.append(key)
    tsv.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text("".join(lines))
    return keys
