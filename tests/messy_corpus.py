"""A messy collection, written at test time in each source layout, with the outcome every sample
must end with: ``"ok"`` (a row of the table) or the reason of its errors row.

``expected[key]`` lists one outcome per sample that carries ``key`` (a repeated key lists one
``duplicate_key`` per repeat; which copy is kept across partitions is a race, so tests compare
the outcomes of a key as a multiset).
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pillow_crash_plugin import crashing_image

from cachebind.sources import synthetic as syn

Outcomes = dict[str, list[str]]


class Symlink(str):
    """A tar member that is a symbolic link to this target."""


def image(seed: int) -> bytes:
    return syn.image_bytes(seed, (40, 30))


def truncated(seed: int) -> bytes:
    data = image(seed)
    return data[: len(data) // 2]


JUNK = b"this is a text file, not an image" * 4
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>'


def write_tar(path: Path, members: list[tuple[str, bytes | Symlink]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, Symlink):
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def webdataset(root: Path) -> tuple[Path, Outcomes]:
    """Three tar shards: nested member paths, repeats inside a shard and across shards, an SVG,
    a symlink, corrupt and natively crashing images, a caption without image, a zero-byte tar."""
    out = root / "wds"
    out.mkdir(parents=True)
    expected: Outcomes = defaultdict(list)
    first: list[tuple[str, bytes | Symlink]] = []
    for i in range(4):
        first += [(f"k{i}.jpg", image(i)), (f"k{i}.txt", f"caption {i}".encode())]
        expected[f"k{i}"].append("ok")
    first += [("a/x.jpg", image(10)), ("b/x.jpg", image(11))]  # two samples, not one key
    expected["a/x"].append("ok")
    expected["b/x"].append("ok")
    first.append(("k1.jpg", image(12)))  # k1 again, further down the same shard
    expected["k1"].append("duplicate_key")
    first += [("twice.jpg", image(13)), ("twice.jpg", image(14))]  # the same member name twice
    expected["twice"] += ["ok", "duplicate_key"]
    first += [("vector.svg", SVG), ("vector.txt", b"a drawing")]
    expected["vector"].append("unsupported_format")
    first.append(("link.jpg", Symlink("k0.jpg")))
    expected["link"].append("not_a_file")
    first.append(("cut.jpg", truncated(15)))
    expected["cut"].append("truncated")
    first.append(("junk.jpg", JUNK))
    expected["junk"].append("undecodable")
    first.append(("boom.jpg", crashing_image()))
    expected["boom"].append("undecodable")
    first.append(("lonely.txt", b"a caption without its image"))
    expected["lonely"].append("empty")
    write_tar(out / "00000.tar", first)

    second = [("k2.jpg", image(20)), ("m0.jpg", image(21)), ("m1.jpg", image(22))]
    write_tar(out / "00001.tar", second)
    expected["k2"].append("duplicate_key")  # k2 is in both shards: one of them is kept
    expected["m0"].append("ok")
    expected["m1"].append("ok")

    (out / "00002.tar").write_bytes(b"")
    expected["00002.tar#unreadable"].append("empty_shard")
    return out, dict(expected)


HUGE_BYTES = 8 * 2**30


def folder(root: Path, *, bomb: bytes | None = None, huge: bool = False) -> tuple[Path, Outcomes]:
    """Images sharing a stem, a sub-folder with a caption, an SVG, corrupt and crashing files,
    (``bomb``) an image whose decoding passes the sandbox's memory cap and (``huge``) an 8 GiB
    "image" (a sparse file: no disk) that only a reader with a byte budget survives."""
    out = root / "imgs"
    (out / "sub").mkdir(parents=True)
    files = {
        "x.jpg": (image(1), "ok", "x.jpg"),
        "x.png": (syn.image_bytes(2, (40, 30), "PNG"), "ok", "x.png"),
        "sub/y.jpg": (image(3), "ok", "sub/y"),
        "z.jpg": (image(4), "ok", "z"),
        "v.svg": (SVG, "unsupported_format", "v"),
        "c.jpg": (truncated(5), "truncated", "c"),
        "crash.jpg": (crashing_image(), "undecodable", "crash"),
    }
    if bomb is not None:
        files["big.png"] = (bomb, "too_large", "big")
    expected: Outcomes = defaultdict(list)
    for name, (data, outcome, key) in files.items():
        (out / name).write_bytes(data)
        expected[key].append(outcome)
    if huge:
        with open(out / "huge.jpg", "wb") as f:
            f.truncate(HUGE_BYTES)
        expected["huge"].append("too_large")
    (out / "sub" / "y.txt").write_text("a caption")
    return out, dict(expected)


def parquet(root: Path) -> tuple[Path, Outcomes]:
    """Keys repeated inside a row group and across row groups, a null image, junk, a crash,
    and a zero-byte parquet file beside it."""
    out = root / "pq"
    out.mkdir(parents=True)
    rows = [
        ("p0", image(30), "ok"),
        ("p1", image(31), "ok"),
        ("p1", image(32), "duplicate_key"),  # same row group: the first is kept
        ("p2", image(33), "ok"),
        ("p0", image(34), "duplicate_key"),  # another row group
        ("p3", None, "empty"),
        ("p4", crashing_image(), "undecodable"),
        ("p5", JUNK, "undecodable"),
    ]
    table = pa.table(
        {
            "key": [k for k, _, _ in rows],
            "caption": [f"caption of {k}" for k, _, _ in rows],
            "jpg": pa.array([d for _, d, _ in rows], pa.binary()),
        }
    )
    pq.write_table(table, out / "00000.parquet", row_group_size=3)
    (out / "00001.parquet").write_bytes(b"")
    expected: Outcomes = defaultdict(list)
    for key, _, outcome in rows:
        expected[key].append(outcome)
    expected["00001.parquet#unreadable"].append("empty_shard")
    return out, dict(expected)


def samples(expected: Outcomes) -> int:
    return sum(len(v) for v in expected.values())
