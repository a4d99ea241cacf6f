"""The webdataset reader against hostile shards: compressed, bombed, padded and oddly named tars
still end every sample in one row, and no shard makes the reader hold what it does not need."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from cachebind.sources import synthetic as syn
from cachebind.sources.base import MAX_CAPTION_CHARS, Sample, clean_sample
from cachebind.sources.webdataset import list_partitions, read_partition

MiB = 2**20
IMAGE = syn.image_bytes(1, (20, 20))


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def zeros(size: int, chunk: int = MiB) -> Iterator[bytes]:
    """``size`` zero bytes (a multiple of 512), a chunk at a time: gzip makes them a few KB."""
    for start in range(0, size, chunk):
        yield b"\0" * min(chunk, size - start)


END = b"\0" * 1024


def write_gz(path: Path, parts: Iterable[bytes]) -> Path:
    with gzip.open(path, "wb", compresslevel=1) as out:
        for part in parts:
            out.write(part)
    return path


def read(path: Path, max_bytes: int | None = None) -> list[Sample]:
    return [s for p in list_partitions(str(path)) for s in read_partition(p, max_bytes=max_bytes)]


def outcomes(samples: list[Sample]) -> list[tuple[str, str]]:
    return [(s.key, s.error[0] if s.error else "ok") for s in samples]


def peak_bytes(run: Callable[[], object]) -> int:
    """The peak of Python allocations (bytes objects included) while ``run`` runs."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def drain(path: Path, max_bytes: int | None = None) -> Callable[[], None]:
    """Reading the shard without keeping its samples: only the reader's own memory counts."""

    def run() -> None:
        for partition in list_partitions(str(path)):
            for _ in read_partition(partition, max_bytes=max_bytes):
                pass

    return run


def test_a_complete_gzip_shard_reads_all_its_samples(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w:gz") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"000{i}.jpg")
            info.size = len(IMAGE)
            tar.addfile(info, io.BytesIO(IMAGE))
    assert outcomes(read(tmp_path / "a.tar")) == [(f"000{i}", "ok") for i in range(5)]


def test_a_gzip_shard_cut_short_keeps_earlier_samples_and_reports_the_cut(tmp_path: Path) -> None:
    path = write_gz(
        tmp_path / "a.tar", [member(f"000{i}.jpg", syn.image_bytes(i)) for i in range(6)] + [END]
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    samples = read(path)
    assert 0 < len([s for s in samples if s.error is None]) < 6
    assert samples[-1].key.startswith("a.tar#") and samples[-1].error[0] == "truncated"


def test_a_plain_tar_cut_at_a_member_boundary_is_truncated(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(member("0000.jpg", IMAGE) + member("0001.jpg", IMAGE))
    assert outcomes(read(tmp_path / "a.tar")) == [("0000", "ok"), ("a.tar#0001", "truncated")]


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.GNUTYPE_LONGNAME, "long-name"),
        (tarfile.GNUTYPE_LONGLINK, "long-link"),
        (tarfile.XHDTYPE, "pax"),
        (tarfile.XGLTYPE, "pax"),
    ],
)
def test_an_extended_header_bomb_is_refused_unread_and_earlier_samples_kept(
    tmp_path: Path, kind: bytes, what: str
) -> None:
    # 200 MiB declared for a header (a few hundred KB of gzip): tarfile would hold it whole.
    size = 200 * MiB
    parts = [member("0000.jpg", IMAGE), header("././@LongLink", size, kind), *zeros(size), END]
    path = write_gz(tmp_path / "a.tar", parts)
    assert peak_bytes(drain(path)) < 16 * MiB
    (good, refused) = read(path)
    assert (good.key, good.error, good.image) == ("0000", None, IMAGE)
    assert refused.key == "a.tar#0000" and refused.error[0] == "too_large"
    assert what in refused.error[1] and "over the limit" in refused.error[1]


def test_members_no_sample_uses_are_skipped_unread(tmp_path: Path) -> None:
    # Ten 8 MiB members beside the image: held, they are 80 MiB for one sample.
    parts = [member("0000.jpg", IMAGE)]
    for i in range(10):
        parts += [header(f"0000.x{i}", 8 * MiB), *zeros(8 * MiB)]
    path = write_gz(tmp_path / "a.tar", [*parts, END])
    assert peak_bytes(drain(path)) < 16 * MiB
    (sample,) = read(path)
    assert (sample.key, sample.error, sample.image) == ("0000", None, IMAGE)


def test_a_sample_whose_members_together_pass_the_budget_is_too_large(tmp_path: Path) -> None:
    png = syn.image_bytes(2, (40, 40), "PNG")
    budget = max(len(IMAGE), len(png)) + 10
    path = write_gz(tmp_path / "a.tar", [member("0000.jpg", IMAGE), member("0000.png", png), END])
    (sample,) = read(path, max_bytes=budget)
    assert sample.error[0] == "too_large" and "together" in sample.error[1]


def test_memory_stays_flat_over_many_tiny_members(tmp_path: Path) -> None:
    def shard(n: int) -> Path:
        parts = (member(f"{i:07d}.cls", b"1") for i in range(n))
        return write_gz(tmp_path / f"{n}.tar", [*parts, END])

    few, many = peak_bytes(drain(shard(1_000))), peak_bytes(drain(shard(20_000)))
    assert many < few + 512 * 1024  # not a header object kept per member
    assert len(read(tmp_path / "20000.tar")) == 20_000  # each one an `empty` sample still


def test_metadata_over_its_limit_makes_the_sample_too_large_unparsed(tmp_path: Path) -> None:
    meta = json.dumps({f"k{i}": i for i in range(200_000)}).encode()  # about 3 MiB
    parts = [member("0000.jpg", IMAGE), member("0000.json", meta), END]
    (sample,) = read(write_gz(tmp_path / "a.tar", parts))
    assert sample.key == "0000" and sample.error[0] == "too_large"
    assert "metadata limit" in sample.error[1] and sample.extra == {}


def test_a_long_caption_is_read_only_as_far_as_it_is_kept(tmp_path: Path) -> None:
    caption = "é" * (2 * MiB)  # 4 MiB of UTF-8
    parts = [member("0000.jpg", IMAGE), member("0000.txt", caption.encode()), END]
    (sample,) = read(write_gz(tmp_path / "a.tar", parts))
    assert sample.error is None and len(sample.caption) <= 4 * MAX_CAPTION_CHARS
    assert clean_sample(sample).caption == caption[:MAX_CAPTION_CHARS]


def test_double_underscore_images_are_samples_and_webdataset_metadata_is_skipped(
    tmp_path: Path,
) -> None:
    parts = [
        member("__index__.json", b"{}"),
        member("__key__.txt", b"webdataset meta"),
        member("__hidden.jpg", IMAGE),
        member("__odd__.png", IMAGE),
        member("000000001.jpg", IMAGE),
        END,
    ]
    (tmp_path / "a.tar").write_bytes(b"".join(parts))
    assert outcomes(read(tmp_path / "a.tar")) == [
        ("__hidden", "ok"),
        ("__odd__", "ok"),
        ("000000001", "ok"),
    ]


def test_a_damaged_header_mid_shard_is_reported_not_taken_for_the_end(tmp_path: Path) -> None:
    garbage = b"not a tar header".ljust(512, b"x")
    parts = [member("0000.jpg", IMAGE), garbage, member("0001.jpg", IMAGE), END]
    (tmp_path / "a.tar").write_bytes(b"".join(parts))
    (good, damaged) = read(tmp_path / "a.tar")
    assert (good.key, good.error) == ("0000", None)
    assert damaged.key == "a.tar#0000" and damaged.error[0] == "unreadable"
    assert "damaged header" in damaged.error[1]
