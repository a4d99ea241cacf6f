"""Untidy sources: what a reader yields is storable, and one odd file stays one error.

Keys, captions and urls leave the readers as valid UTF-8 strings (or None) whatever the source
holds: a file name that is not UTF-8, a JSON key with a lone surrogate, a caption of 5. These
crashed the whole job where the row id or the Arrow row was made.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import embed_settings
from ray_local import use_local_ray

from cachebind.sources import list_partitions, read_partition
from cachebind.sources import synthetic as syn
from cachebind.sources.base import MAX_CAPTION_CHARS
from cachebind.sources.cc3m import MAX_LINE_BYTES, img2dataset_key
from jobs.embed import run_embed


def read_all(spec: str) -> list:
    return [s for p in list_partitions(spec) for s in read_partition(p)]


def storable(*values: str | None) -> bool:
    return all(v is None or (isinstance(v, str) and v.encode("utf-8")) for v in values)


def tar_of(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module's jobs: each would otherwise start (and pay for) its own."""
    use_local_ray(num_cpus=2)


@pytest.fixture
def untidy(tmp_path: Path) -> dict[str, str]:
    """The same untidiness in a tar, a folder and a parquet file; spec by kind."""
    tar_of(
        tmp_path / "00000.tar",
        {
            "bad\udcff.jpg": syn.image_bytes(1),  # a name that was not UTF-8 on disk
            "j.jpg": syn.image_bytes(2),
            "j.json": json.dumps({"key": "\ud800x", "caption": 5, "url": ["a"]}).encode(),
            "ok.jpg": syn.image_bytes(3),
            "ok.txt": b"a caption",
        },
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/bad\xff.jpg", "wb") as f:
        f.write(syn.image_bytes(4))
    (folder / "u.jpg").write_bytes(syn.image_bytes(5))
    (folder / "u.json").write_text(json.dumps({"url": 7}))
    table = pa.table({"jpg": [syn.image_bytes(6)] * 2, "caption": [1.5, None], "key": ["a", "b"]})
    pq.write_table(table, tmp_path / "t.parquet")
    return {
        "webdataset": f"webdataset:{tmp_path}/00000.tar",
        "folder": f"folder:{folder}",
        "parquet": f"parquet:{tmp_path}/t.parquet",
    }


@pytest.mark.parametrize("kind", ["webdataset", "folder", "parquet"])
def test_keys_captions_and_urls_come_out_as_storable_text(untidy, kind) -> None:
    samples = read_all(untidy[kind])
    assert all(s.image for s in samples)  # nothing lost for being untidy
    assert all(storable(s.key, s.caption, s.url) for s in samples)
    assert len({s.key for s in samples}) == len(samples)


def test_the_untidy_values_keep_what_can_be_kept(untidy) -> None:
    wds = {s.key: s for s in read_all(untidy["webdataset"])}
    assert set(wds) == {"bad\\udcff", "\\ud800x", "ok"}
    assert (wds["\\ud800x"].caption, wds["\\ud800x"].url) == ("5", None)
    assert [s.caption for s in read_all(untidy["parquet"])] == ["1.5", None]
    assert {s.key: s.url for s in read_all(untidy["folder"])} == {"bad\\udcff": None, "u": "7"}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_an_untidy_webdataset_embeds_every_sample(untidy, tmp_path: Path) -> None:
    s = embed_settings(tmp_path / "db", thumbnails=False)
    report = run_embed(untidy["webdataset"], s, progress=False)
    assert (report.rows_written, report.errors_written) == (3, 0)


def test_a_parquet_file_without_the_columns_is_one_error_and_the_others_are_read(
    tmp_path: Path,
) -> None:
    syn.write_parquet(tmp_path / "pq" / "a.parquet", 3)
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "pq" / "b.parquet")
    samples = read_all(f"parquet:{tmp_path}/pq")
    assert sum(s.image is not None for s in samples) == 3
    assert [(s.key, s.error[0]) for s in samples if s.error] == [
        ("b.parquet#unreadable", "wrong_columns")
    ]
    # When no file has them, the spec is what is wrong: the job does not start.
    with pytest.raises(ValueError, match="no image column"):
        list_partitions(f"parquet:{tmp_path}/pq/b.parquet")


def test_an_enormous_tsv_row_is_too_large_and_the_rows_after_it_are_read(tmp_path: Path) -> None:
    tsv = tmp_path / "c.tsv"
    with open(tsv, "wb") as f:
        f.write(b"first\thttp://x/0\n")
        f.write(b"y" * (3 * MAX_LINE_BYTES) + b"\thttp://x/1\n")
        f.write(b"third\thttp://x/2\n")
        f.write(b"z" * (MAX_CAPTION_CHARS + 10) + b"\thttp://x/3\n")
    images = tmp_path / "img"
    images.mkdir()
    keys = [img2dataset_key(row, 2, 4, 5) for row in range(4)]  # two rows a shard: two shards
    for i, key in enumerate(keys):
        (images / f"{key}.jpg").write_bytes(syn.image_bytes(i))
    samples = read_all(f"cc3m:{tsv}?images={images}&samples_per_shard=2")
    assert [s.key for s in samples] == keys
    assert [s.error[0] if s.error else s.caption[:5] for s in samples] == [
        "first",
        "too_large",
        "third",
        "zzzzz",
    ]
    assert len(samples[3].caption) == MAX_CAPTION_CHARS


def test_a_mapping_without_its_columns_is_refused_when_the_source_is_listed(
    tmp_path: Path,
) -> None:
    (tmp_path / "c.tsv").write_text("one\thttp://a/1.jpg\n")
    (tmp_path / "map.csv").write_text("URL,file\nhttp://a/1.jpg,1.jpg\n")
    spec = f"cc3m:{tmp_path}/c.tsv?images={tmp_path}&join=mapping&mapping={tmp_path}/map.csv"
    with pytest.raises(ValueError, match="needs a header url,path"):
        list_partitions(spec)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_row_group_cut_by_a_corrupt_page_accounts_for_every_row(tmp_path: Path) -> None:
    table = pa.table(
        {"key": [f"k{i}" for i in range(100)], "jpg": [syn.image_bytes(i) for i in range(100)]}
    )
    path = tmp_path / "pq" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, data_page_size=8192, compression="snappy", use_dictionary=False)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 3000] = b"\xaa" * 3000
    path.write_bytes(bytes(data))
    s = embed_settings(tmp_path / "db", thumbnails=False)
    report = run_embed(f"parquet:{path.parent}", s, progress=False)
    assert report.rows_written + report.errors_written == 100
    assert report.errors_by_reason.get("unreadable", 0) >= 1
