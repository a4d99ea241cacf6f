"""Readers: every source layout becomes partitions with stable ids and samples with unique keys."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cachebind.sources import list_partitions, parse_source, read_partition
from cachebind.sources import synthetic as syn
from cachebind.sources.base import expand_braces
from cachebind.sources.cc3m import img2dataset_key


def read_all(spec: str) -> list:
    return [s for p in list_partitions(spec) for s in read_partition(p)]


def test_brace_patterns_expand_like_webdataset() -> None:
    assert expand_braces("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_parse_source_names_or_detects_the_kind(tmp_path: Path) -> None:
    syn.write_webdataset(tmp_path / "wds", 3)
    syn.write_parquet(tmp_path / "pq" / "x.parquet", 3)
    syn.write_folder(tmp_path / "imgs", 2)
    assert parse_source(str(tmp_path / "wds")).kind == "webdataset"
    assert parse_source(str(tmp_path / "pq")).kind == "parquet"
    assert parse_source(str(tmp_path / "pq" / "x.parquet")).kind == "parquet"
    assert parse_source(str(tmp_path / "imgs")).kind == "folder"
    spec = parse_source("cc3m:/data/Train_GCC-training.tsv?images=/data/cc3m&join=key")
    assert (spec.kind, spec.uri) == ("cc3m", "/data/Train_GCC-training.tsv")
    assert spec.options == {"images": "/data/cc3m", "join": "key"}
    # A URI scheme is not a kind.
    assert parse_source("s3://bucket/shards/00000.tar").uri == "s3://bucket/shards/00000.tar"
    assert parse_source("wds:file:///x/{0..1}.tar").kind == "webdataset"
    with pytest.raises(ValueError, match="cannot tell the kind"):
        parse_source(str(tmp_path / "nothing-here"))


def test_webdataset_shards_group_members_into_samples(tmp_path: Path) -> None:
    keys = syn.write_webdataset(tmp_path, 25, per_shard=10)
    partitions = list_partitions(f"webdataset:{tmp_path}/{{00000..00002}}.tar")
    assert [p.id for p in partitions] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = [s for p in partitions for s in read_partition(p)]
    assert [s.key for s in samples] == keys
    first = samples[0]
    assert first.caption == "a picture number 0"
    assert first.url == "http://example.com/000000000.jpg"
    assert first.extra["status"] == "success"
    assert Image.open(io.BytesIO(first.image)).size == (64, 48)


def test_a_shard_file_replaced_since_listing_gets_a_new_fingerprint(tmp_path: Path) -> None:
    syn.write_webdataset(tmp_path / "wds", 20, per_shard=10)
    before = list_partitions(str(tmp_path / "wds"))
    assert [p.fingerprint() for p in list_partitions(str(tmp_path / "wds"))] == [
        p.fingerprint() for p in before
    ]
    syn.write_webdataset(tmp_path / "wds", 25, per_shard=15)  # same names, new contents
    after = list_partitions(str(tmp_path / "wds"))
    assert [p.id for p in after] == [p.id for p in before]
    assert all(a.fingerprint() != b.fingerprint() for a, b in zip(after, before, strict=True))
    assert after[0].stamp.startswith(f"{(tmp_path / 'wds' / '00000.tar').stat().st_size}:")


def test_stamps_from_one_listing_equal_each_files_own_info(tmp_path: Path) -> None:
    from cachebind.sources.base import _stamp, file_stamps, url_to_fs

    syn.write_webdataset(tmp_path / "wds", 30, per_shard=10)
    uris = [str(tmp_path / "wds" / f"0000{i}.tar") for i in range(3)] + [str(tmp_path / "wds")]
    stamps = file_stamps(uris)
    for uri in uris:
        fs, path = url_to_fs(uri)
        assert stamps[uri] == _stamp(fs.info(path))
    assert stamps[str(tmp_path / "wds")] == ""  # a folder: its chunks list their files


def test_webdataset_cut_short_keeps_earlier_samples_and_reports_the_cut(tmp_path: Path) -> None:
    syn.write_webdataset(tmp_path, 6)
    tar = tmp_path / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    samples = read_all(str(tar))
    good = [s for s in samples if s.error is None]
    assert 0 < len(good) < 6
    assert samples[-1].error is not None and samples[-1].error[0] == "truncated"


def test_webdataset_member_without_image_is_an_error_sample(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, payload in [("k1.txt", b"caption only"), ("k1.json", b'{"url": "u"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (sample,) = read_all(str(tmp_path / "00000.tar"))
    assert sample.image is None and sample.error[0] == "empty"
    assert (sample.caption, sample.url) == ("caption only", "u")


def test_fsspec_uris_file_and_memory(tmp_path: Path) -> None:
    keys = syn.write_webdataset(tmp_path, 12, per_shard=5)
    assert [s.key for s in read_all(f"file://{tmp_path}/{{00000..00002}}.tar")] == keys
    fs = fsspec.filesystem("memory")
    root = f"/cachebind-test-{uuid.uuid4().hex}"
    for tar in sorted(tmp_path.glob("*.tar")):
        fs.pipe(f"{root}/{tar.name}", tar.read_bytes())
    assert [s.key for s in read_all(f"memory://{root}")] == keys
    assert [s.key for s in read_all(f"webdataset:memory://{root}/{{00001..00002}}.tar")] == keys[5:]
    fs.rm(root, recursive=True)


def test_img2dataset_parquet_one_partition_per_row_group(tmp_path: Path) -> None:
    keys = syn.write_parquet(tmp_path / "00000.parquet", 25, row_group_size=10)
    partitions = list_partitions(str(tmp_path))
    assert [p.id for p in partitions] == [
        "00000.parquet#rg0",
        "00000.parquet#rg1",
        "00000.parquet#rg2",
    ]
    assert [p.options["num_samples"] for p in partitions] == [10, 10, 5]
    samples = [s for p in partitions for s in read_partition(p)]
    assert [s.key for s in samples] == keys
    assert samples[3].caption == "parquet caption 3"
    assert Image.open(io.BytesIO(samples[3].image)).format == "JPEG"


def test_parquet_failed_downloads_and_wrong_types_become_errors(tmp_path: Path) -> None:
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "status": ["success", "failed_to_download", "success"],
            "error_message": [None, "HTTP 404", None],
            "jpg": [syn.image_bytes(0), None, syn.image_bytes(1)],
        }
    )
    pq.write_table(table, tmp_path / "x.parquet")
    samples = read_all(str(tmp_path / "x.parquet"))
    assert [s.error for s in samples] == [None, ("not_downloaded", "HTTP 404"), None]
    pq.write_table(pa.table({"image": [1, 2]}), tmp_path / "ints.parquet")
    assert {s.error[0] for s in read_all(str(tmp_path / "ints.parquet"))} == {"wrong_type"}


def test_parquet_of_paths_with_named_columns(tmp_path: Path) -> None:
    syn.write_folder(tmp_path / "imgs", 4, captions=False)
    table = pa.table(
        {
            "file_name": [f"imgs/img{i:04d}.jpg" for i in range(4)] + ["imgs/gone.jpg"],
            "alt_text": [f"alt {i}" for i in range(5)],
        }
    )
    pq.write_table(table, tmp_path / "index.parquet")
    samples = read_all(
        f"parquet:{tmp_path}/index.parquet?path_column=file_name&caption_column=alt_text"
    )
    assert [s.key for s in samples[:2]] == ["imgs/img0000.jpg", "imgs/img0001.jpg"]
    assert samples[1].caption == "alt 1"
    assert samples[1].image == (tmp_path / "imgs" / "img0001.jpg").read_bytes()
    assert samples[4].error[0] == "missing"
    with pytest.raises(ValueError, match="no image column"):
        list_partitions(f"parquet:{tmp_path}/index.parquet")


def test_folder_with_sidecar_captions_and_chunks(tmp_path: Path) -> None:
    keys = syn.write_folder(tmp_path, 7, subdirs=2)
    (tmp_path / "notes.md").write_text("not an image")
    partitions = list_partitions(f"folder:{tmp_path}?chunk_size=3")
    assert [p.id for p in partitions] == ["part-00000", "part-00001", "part-00002"]
    samples = [s for p in partitions for s in read_partition(p)]
    # Every file is a sample but the captions (counted as sidecars): notes.md too, for the
    # decoder to judge, under its whole name.
    assert sorted(s.key for s in samples) == sorted([*keys, "notes.md"])
    assert sum(p.non_samples for p in partitions) == 7
    by_key = {s.key: s for s in samples}
    assert by_key["d1/img0003"].caption == "caption 3"
    assert by_key["notes.md"].image == b"not an image"
    # Same files, same partitions: the fingerprint is what resume trusts.
    again = list_partitions(f"folder:{tmp_path}?chunk_size=3")
    assert [p.fingerprint() for p in again] == [p.fingerprint() for p in partitions]
    (tmp_path / "d0" / "a-new.jpg").write_bytes(syn.image_bytes(99))  # sorts first
    changed = list_partitions(f"folder:{tmp_path}?chunk_size=3")
    assert changed[0].fingerprint() != partitions[0].fingerprint()


def test_cc3m_tsv_joined_by_img2dataset_keys(tmp_path: Path) -> None:
    keys = syn.write_cc3m(tmp_path / "cc3m.tsv", tmp_path / "images", 25, missing=(3, 17))
    spec = f"{tmp_path}/cc3m.tsv?images={tmp_path}/images&samples_per_shard=10"
    partitions = list_partitions(spec)
    assert [p.id for p in partitions] == ["cc3m.tsv#00000", "cc3m.tsv#00001", "cc3m.tsv#00002"]
    assert [p.options["num_samples"] for p in partitions] == [10, 10, 5]
    samples = [s for p in partitions for s in read_partition(p)]
    assert len(samples) == 25
    assert [s.key for s in samples if s.error is None] == keys
    missing = [s for s in samples if s.error is not None]
    assert [s.key for s in missing] == [img2dataset_key(3, 10, 4, 5), img2dataset_key(17, 10, 4, 5)]
    assert {s.error[0] for s in missing} == {"missing"}
    assert samples[12].caption == "cc3m caption 12"
    assert samples[12].url == "http://example.com/cc3m/12.jpg"
    assert img2dataset_key(123_456, 10_000, 4, 5) == "000123456"


def test_cc3m_tsv_joined_by_a_url_mapping(tmp_path: Path) -> None:
    (tmp_path / "tsv").mkdir()
    (tmp_path / "tsv" / "c.tsv").write_text("first\thttp://a/1.jpg\nsecond\thttp://a/2.jpg\n")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "one.png").write_bytes(syn.image_bytes(1, fmt="PNG"))
    (tmp_path / "map.csv").write_text("url,path\nhttp://a/1.jpg,one.png\n")
    samples = read_all(
        f"cc3m:{tmp_path}/tsv/c.tsv?images={tmp_path}/dl&join=mapping&mapping={tmp_path}/map.csv"
    )
    assert samples[0].image == (tmp_path / "dl" / "one.png").read_bytes()
    assert samples[0].caption == "first"
    assert samples[1].error[0] == "missing"
    with pytest.raises(ValueError, match="images folder"):
        list_partitions(f"cc3m:{tmp_path}/tsv/c.tsv")


def test_partitions_travel_as_plain_data(tmp_path: Path) -> None:
    from cachebind.sources import Partition

    syn.write_cc3m(tmp_path / "c.tsv", tmp_path / "i", 3)
    (partition,) = list_partitions(f"{tmp_path}/c.tsv?images={tmp_path}/i")
    copy = Partition.from_dict(json.loads(json.dumps(partition.to_dict())))
    assert copy == partition and copy.fingerprint() == partition.fingerprint()


READER_REASONS = {"unsupported_format", "not_a_file", "empty", "empty_shard"}
"""What the readers themselves can tell; the rest is for the decoder (and the job) to find."""


def test_files_over_the_byte_budget_are_too_large_in_every_reader_and_the_rest_is_read(
    tmp_path: Path,
) -> None:
    from messy_corpus import write_tar

    budget = 10_000
    small, big = syn.image_bytes(1, (20, 20)), b"\xff" * (budget + 1)
    # webdataset: a big image, then a big caption beside a small image, then a normal sample;
    # the stream skips the big members and reads what follows.
    (tmp_path / "wds").mkdir()
    write_tar(
        tmp_path / "wds" / "00000.tar",
        [("a.jpg", big), ("b.jpg", small), ("b.txt", big), ("c.jpg", small), ("c.txt", b"ok")],
    )
    # folder, parquet of paths, cc3m: a file past the budget, told by its size before a read.
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(big)
    (tmp_path / "imgs" / "c.jpg").write_bytes(small)
    pq.write_table(pa.table({"path": ["imgs/a.jpg", "imgs/c.jpg"]}), tmp_path / "p.parquet")
    (tmp_path / "cc.tsv").write_text("big\thttp://x/a\nsmall\thttp://x/c\n")
    (tmp_path / "map.csv").write_text("url,path\nhttp://x/a,a.jpg\nhttp://x/c,c.jpg\n")
    specs = {
        "webdataset": f"{tmp_path}/wds",
        "folder": f"folder:{tmp_path}/imgs",
        "parquet": f"parquet:{tmp_path}/p.parquet?path_column=path",
        "cc3m": f"cc3m:{tmp_path}/cc.tsv?images={tmp_path}/imgs&join=mapping"
        f"&mapping={tmp_path}/map.csv",
    }
    for kind, spec in specs.items():
        samples = [s for p in list_partitions(spec) for s in read_partition(p, max_bytes=budget)]
        outcomes = [s.error[0] if s.error else "ok" for s in samples]
        want = ["too_large", "too_large", "ok"] if kind == "webdataset" else ["too_large", "ok"]
        assert outcomes == want, kind
        assert f"over the budget of {budget:,}" in samples[0].error[1], kind
        assert samples[-1].image == small, kind


@pytest.mark.parametrize("layout", ["webdataset", "folder", "parquet"])
def test_every_sample_of_a_messy_source_is_read_once_under_a_unique_enough_key(
    tmp_path: Path, layout: str
) -> None:
    import messy_corpus as messy

    root, expected = getattr(messy, layout)(tmp_path)
    spec = f"folder:{root}?chunk_size=3" if layout == "folder" else str(root)
    got = Counter((s.key, s.error[0] if s.error else None) for s in read_all(spec))
    want = Counter(
        (key, outcome if outcome in READER_REASONS else None)
        for key, outcomes in expected.items()
        for outcome in outcomes
    )
    assert got == want


def test_tar_member_paths_keep_their_folders_and_flat_keys_stay_as_they_were(
    tmp_path: Path,
) -> None:
    from messy_corpus import image, write_tar

    write_tar(
        tmp_path / "00000.tar",
        [("000000001.jpg", image(1)), ("a/x.jpg", image(2)), ("./b/x.jpg", image(3))],
    )
    assert [s.key for s in read_all(str(tmp_path / "00000.tar"))] == ["000000001", "a/x", "b/x"]


def test_reader_reasons_say_what_is_wrong(tmp_path: Path) -> None:
    from messy_corpus import SVG, Symlink, write_tar

    write_tar(tmp_path / "00000.tar", [("v.svg", SVG), ("l.jpg", Symlink("../etc/passwd"))])
    (tmp_path / "00001.tar").write_bytes(b"")
    errors = {s.key: s.error for s in read_all(str(tmp_path))}
    assert errors["v"][0] == "unsupported_format" and ".svg" in errors["v"][1]
    assert errors["l"][0] == "not_a_file" and "symlink to '../etc/passwd'" in errors["l"][1]
    assert errors["00001.tar#unreadable"][0] == "empty_shard"


def test_an_ordinary_folder_keeps_its_partitions_and_keys(tmp_path: Path) -> None:
    keys = syn.write_folder(tmp_path, 5)
    (partition,) = list_partitions(f"folder:{tmp_path}")
    assert set(partition.options) == {"files", "num_samples"}  # fingerprints as before
    assert [s.key for s in read_partition(partition)] == keys


def test_a_parquet_row_group_over_its_budget_is_too_large_row_by_row_and_unread(
    tmp_path: Path,
) -> None:
    keys = syn.write_parquet(tmp_path / "x.parquet", 30, row_group_size=10)
    spec = f"parquet:{tmp_path}/x.parquet"
    group_bytes = pq.ParquetFile(tmp_path / "x.parquet").metadata.row_group(0).total_byte_size
    parts = list_partitions(spec)

    def read(budget: int | None) -> list:
        return [s for p in parts for s in read_partition(p, max_group_bytes=budget)]

    whole = read(None)
    assert [s.key for s in whole] == keys and all(s.image for s in whole)
    assert [s.image for s in read(group_bytes * 2)] == [s.image for s in whole]
    refused = read(group_bytes // 4)
    # Every row is still accounted for, under its own key, with a reason that says what to do.
    assert [s.key for s in refused] == keys
    assert {s.error[0] for s in refused} == {"too_large"}
    assert "smaller row groups" in refused[0].error[1]


def test_parquet_rows_come_in_batches_not_a_whole_row_group_of_python_objects(
    tmp_path: Path,
) -> None:
    # 40 rows of 4 MiB in one row group. Turned into Python objects all at once they are 160 MiB
    # besides Arrow's own copy; in the reader's batches of 64 MiB, 16 rows at a time.
    big = [bytes([i]) * (4 * 2**20) for i in range(40)]
    table = pa.table({"key": [f"k{i}" for i in range(40)], "jpg": big})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=40)
    (part,) = list_partitions(f"parquet:{tmp_path}/big.parquet")
    samples = read_partition(part)
    tracemalloc.start()  # Python allocations only: exactly the bytes objects of the rows
    try:
        first = next(samples)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.image == big[0]
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB of Python objects for the first row"
    assert [s.image for s in samples] == big[1:]
