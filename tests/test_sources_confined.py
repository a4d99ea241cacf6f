"""Readers read only what their source holds.

A path that a source's data names (a parquet cell, a row of a CC3M mapping, a link in an image
folder) may not lead out of the source's folder: a downloaded parquet naming ``/home/op/…``
would otherwise copy private files into the cache and their thumbnails into search results.
And a name that is not a regular file (a FIFO, a device, a folder) is refused at once: opening a
FIFO waits for a writer forever, and a worker stuck on one is a job that never ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cachebind.sources import list_partitions, read_partition
from cachebind.sources import synthetic as syn
from cachebind.sources.base import OutsideSource, path_inside

SECRET = syn.image_bytes(99)


def read_all(spec: str) -> dict[str, Any]:
    """key -> image bytes, or the error's reason; bounded in time, since a FIFO could block."""
    return bounded(
        lambda: {
            s.key: s.image or s.error[0] for p in list_partitions(spec) for s in read_partition(p)
        }
    )


def bounded(work: Callable[[], Any], seconds: float = 60) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the test below
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)  # a blocked open must not hold pytest
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"reading did not finish in {seconds} s (blocked on a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file beside the source, not in it (a private photo of the operator's, say)."""
    path = tmp_path / "private" / "photo.jpg"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def test_parquet_paths_that_lead_out_of_its_folder_are_refused_and_the_rest_is_read(
    tmp_path: Path, secret: Path
) -> None:
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "ok.jpg").write_bytes(syn.image_bytes(1))
    (data / "imgs" / "inner.jpg").symlink_to(data / "imgs" / "ok.jpg")
    (data / "imgs" / "link.jpg").symlink_to(secret)
    inside = {"ok": "imgs/ok.jpg", "dots": "imgs/../imgs/./ok.jpg", "inner": "imgs/inner.jpg"}
    outside = {
        "absolute": str(secret),
        "climb": "../private/photo.jpg",
        "deep_climb": "imgs/../../private/photo.jpg",
        "link": "imgs/link.jpg",
        "file_uri": f"file://{secret}",
        "other_store": "s3://somebody-else/photo.jpg",
    }

    def write(rows: dict[str, str], name: str) -> str:
        table = pa.table({"key": list(rows), "path": list(rows.values())})
        pq.write_table(table, data / name)
        return f"parquet:{data}/{name}?path_column=path"

    spec = write(inside | outside | {"folder": "imgs"}, "paths.parquet")
    got = read_all(spec)
    assert {k: got[k] for k in inside} == {k: syn.image_bytes(1) for k in inside}
    assert {k: got[k] for k in outside} == {k: "outside_source" for k in outside}
    assert got["folder"] == "not_a_file"
    detail = next(s.error[1] for p in list_partitions(spec) for s in read_partition(p) if s.error)
    assert "allow_outside=1" in detail  # the report says how to trust such a file

    # An operator who trusts the file lifts the check (another store is not asked here).
    del outside["other_store"]
    trusted = read_all(write(inside | outside, "trusted.parquet") + "&allow_outside=1")
    assert [trusted[k] for k in outside] == [SECRET] * len(outside)


def test_a_hugging_face_image_struct_without_bytes_may_not_name_a_file_elsewhere(
    tmp_path: Path, secret: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_bytes(syn.image_bytes(2))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": None, "path": "a.jpg"}, {"bytes": None, "path": str(secret)}]
    table = pa.table({"key": ["here", "there"], "image": pa.array(images, type=struct)})
    pq.write_table(table, tmp_path / "data" / "hf.parquet")
    assert read_all(f"parquet:{tmp_path}/data/hf.parquet") == {
        "here": syn.image_bytes(2),
        "there": "outside_source",
    }


def test_a_cc3m_mapping_may_not_point_out_of_the_images_folder(
    tmp_path: Path, secret: Path
) -> None:
    (tmp_path / "c.tsv").write_text("one\thttp://a/1.jpg\ntwo\thttp://a/2.jpg\n")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "1.jpg").write_bytes(syn.image_bytes(1))
    (tmp_path / "map.csv").write_text(
        "url,path\nhttp://a/1.jpg,1.jpg\nhttp://a/2.jpg,../private/photo.jpg\n"
    )
    spec = f"cc3m:{tmp_path}/c.tsv?images={tmp_path}/dl&join=mapping&mapping={tmp_path}/map.csv"
    assert list(read_all(spec).values()) == [syn.image_bytes(1), "outside_source"]
    assert list(read_all(spec + "&allow_outside=1").values()) == [syn.image_bytes(1), SECRET]


def test_a_folders_links_out_and_fifos_are_refused_not_waited_on(
    tmp_path: Path, secret: Path
) -> None:
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    (imgs / "a.jpg").write_bytes(syn.image_bytes(1))
    (imgs / "sub" / "b.jpg").write_bytes(syn.image_bytes(2))
    (imgs / "b_again.jpg").symlink_to(imgs / "sub" / "b.jpg")  # a link inside the folder
    (imgs / "leak.jpg").symlink_to(secret)
    os.mkfifo(imgs / "pipe.jpg")
    (imgs / "captioned.jpg").write_bytes(syn.image_bytes(3))
    os.mkfifo(imgs / "captioned.txt")  # a sidecar that would block as well
    (imgs / "null.jpg").symlink_to("/dev/zero")  # endless bytes, and outside the folder

    got = read_all(f"folder:{imgs}")
    assert got == {
        "a": syn.image_bytes(1),
        "sub/b": syn.image_bytes(2),
        "b_again": syn.image_bytes(2),
        "leak": "outside_source",
        "pipe": "not_a_file",
        "captioned": "not_a_file",
        "null": "outside_source",
    }
    trusted = read_all(f"folder:{imgs}?allow_outside=1")
    assert (trusted["leak"], trusted["pipe"], trusted["null"]) == (
        SECRET,
        "not_a_file",
        "not_a_file",
    )


def test_a_shard_that_is_a_fifo_is_one_error_row_and_the_other_shards_are_read(
    tmp_path: Path,
) -> None:
    keys = syn.write_webdataset(tmp_path / "wds", 4, per_shard=4)
    os.mkfifo(tmp_path / "wds" / "00001.tar")
    got = read_all(f"webdataset:{tmp_path}/wds")
    assert len(keys) == 4 and all(isinstance(got[k], bytes) for k in keys)
    assert got["00001.tar#unreadable"] == "not_a_file"

    syn.write_parquet(tmp_path / "pq" / "00000.parquet", 3)
    os.mkfifo(tmp_path / "pq" / "00001.parquet")
    got = read_all(f"parquet:{tmp_path}/pq")
    assert sum(isinstance(v, bytes) for v in got.values()) == 3
    assert got["00001.parquet#unreadable"] == "not_a_file"


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "..", "s3://b/x.jpg", "C:\\x.jpg", "a\0b.jpg"],
)
def test_a_path_from_the_data_is_relative_and_stays_below_its_folder(name: str) -> None:
    with pytest.raises(OutsideSource):
        path_inside("s3://bucket/data", name)


def test_a_path_that_stays_below_its_folder_is_joined_clean() -> None:
    assert path_inside("s3://bucket/data/", "imgs/./a/../b.jpg") == "s3://bucket/data/imgs/b.jpg"
    assert path_inside("/srv/data", "..hidden.jpg") == "/srv/data/..hidden.jpg"
