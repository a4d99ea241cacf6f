"""Object stores: sources and the cache's table on S3, against moto's S3 server on 127.0.0.1.

The same generated data is written to local files and uploaded to a bucket. Every reader yields
from ``s3://`` exactly the samples it yields from the local files; the embedding job reads its
source from S3 and writes its table, errors, progress and report to ``s3://``; the index is built
from that table (in Ray tasks, with the index directory on local disk) and finds its rows, and
the service answers searches and thumbnails from it.

Only the configuration (``store.s3``) says how to reach the server: the AWS variables are
cleared for the whole module, Ray workers included, so nothing works by accident of the
environment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from moto.server import ThreadedMotoServer
from ray_local import stop_local_ray

import indexing
from cachebind.cli import main as cli_main
from cachebind.client import CachebindClient, input_item
from cachebind.config import S3Config, load_config
from cachebind.sources import StorageOptions, list_partitions, read_partition
from cachebind.sources import synthetic as syn
from cachebind.storage import lance_options
from cachebind.store import CacheTable, connect, row_id
from jobs.embed import run_embed

BUCKET = "cachebind-test"
REGION = "eu-west-1"  # not AWS's default, so that the configured one is the one used


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_s3_section_becomes_fsspec_and_lance_options() -> None:
    s3 = S3Config(
        endpoint_url="http://minio:9000",
        region="eu-west-1",
        access_key_id="AK",
        secret_access_key="SK",
        session_token=None,
        allow_http=None,
    )
    fs_kwargs = {
        "use_listings_cache": False,  # a later job in the same process sees new objects
        "endpoint_url": "http://minio:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "key": "AK",
        "secret": "SK",
    }
    storage = StorageOptions.from_s3(s3)
    assert storage.for_uri("s3://b/x.tar") == storage.for_uri("s3a://b/x.tar") == fs_kwargs
    assert storage.for_uri("/data/x.tar") == storage.for_uri("memory://x.tar") == {}
    assert lance_options("s3://b/cache", s3) == {
        "aws_endpoint": "http://minio:9000",
        "aws_region": "eu-west-1",
        "allow_http": "true",  # the endpoint is http://, so plain HTTP is what was asked for
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK",
    }
    assert lance_options("/srv/cache", s3) is None  # a local table gets Lance's defaults
    public = S3Config(
        anonymous=True,
        endpoint_url=None,
        region=None,
        access_key_id=None,
        secret_access_key=None,
        session_token=None,
        allow_http=None,
    )
    assert StorageOptions.from_s3(public).for_uri("s3://b/k") == {
        "use_listings_cache": False,
        "anon": True,
    }
    assert lance_options("s3://b/cache", public) == {"aws_skip_signature": "true"}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Config]:
    """moto's S3 server on a free local port, a bucket, and the settings that reach it."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        # No profile or credentials file of the machine may take part either.
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        config = S3Config(
            endpoint_url=f"http://{host}:{port}",
            region=REGION,
            access_key_id="cachebind-test-key",
            secret_access_key="cachebind-test-secret",
            session_token=None,
            allow_http=None,
        )
        _fs(config).mkdir(BUCKET)
        try:
            yield config
        finally:
            server.stop()


def _fs(config: S3Config) -> Any:
    return StorageOptions.from_s3(config).url_to_fs(f"s3://{BUCKET}")[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, s3: S3Config) -> Path:
    """Every source layout, written locally and uploaded as s3://BUCKET/data/…"""
    root = tmp_path_factory.mktemp("data")
    syn.write_webdataset(root / "wds", 25, per_shard=10)
    syn.write_webdataset(root / "wds-bad", 24, per_shard=8, bad=syn.bad_samples())
    syn.write_parquet(root / "pq" / "00000.parquet", 25, row_group_size=10)
    syn.write_parquet(root / "pq" / "00001.parquet", 7, row_group_size=10)
    keys = syn.write_folder(root / "imgs", 7, subdirs=2)
    pq.write_table(
        pa.table(
            {
                "file_name": [f"imgs/{k}.jpg" for k in keys[:4]] + ["imgs/gone.jpg"],
                "alt_text": [f"alt {i}" for i in range(5)],
            }
        ),
        root / "paths.parquet",
    )
    syn.write_cc3m(root / "cc3m" / "train.tsv", root / "cc3m" / "images", 23, missing=(4, 17))
    _fs(s3).put(f"{root}/", f"{BUCKET}/data/", recursive=True)
    return root


def samples(spec: str, s3: S3Config | None = None) -> list[tuple]:
    storage = StorageOptions.from_s3(s3)
    parts = list_partitions(spec, storage)
    return [
        (p.id, s.key, s.image, s.caption, s.url, s.extra, s.error)
        for p in parts
        for s in read_partition(p, storage)
    ]


REMOTE = f"s3://{BUCKET}/data"


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        # webdataset: a folder (kind detected), a brace pattern, a glob, a named kind
        ("{root}/wds", f"{REMOTE}/wds"),
        ("{root}/wds/{{00000..00002}}.tar", f"{REMOTE}/wds/{{00000..00002}}.tar"),
        ("{root}/wds/0000[12].tar", f"{REMOTE}/wds/0000[12].tar"),
        ("webdataset:{root}/wds/*.tar", f"webdataset:{REMOTE}/wds/*.tar"),
        # parquet: a folder of files (one partition per row group), image paths beside the file
        ("{root}/pq", f"{REMOTE}/pq"),
        (
            "parquet:{root}/paths.parquet?path_column=file_name&caption_column=alt_text",
            f"parquet:{REMOTE}/paths.parquet?path_column=file_name&caption_column=alt_text",
        ),
        # an image folder with sidecar captions, in chunks
        ("folder:{root}/imgs?chunk_size=3", f"folder:{REMOTE}/imgs?chunk_size=3"),
        # a CC3M TSV joined to img2dataset's files output (two rows never downloaded)
        (
            "cc3m:{root}/cc3m/train.tsv?images={root}/cc3m/images&samples_per_shard=10",
            f"cc3m:{REMOTE}/cc3m/train.tsv?images={REMOTE}/cc3m/images&samples_per_shard=10",
        ),
    ],
)
def test_s3_sources_yield_the_samples_of_the_local_files(
    data: Path, s3: S3Config, local: str, remote: str
) -> None:
    want = samples(local.format(root=data))
    got = samples(remote, s3)
    # Most of every layout decodes, so the comparison is of images, not of error messages.
    assert sum(image is not None for _, _, image, *_ in want) >= 4
    assert got == want


def test_s3_partitions_name_the_objects_for_the_workers(data: Path, s3: S3Config) -> None:
    parts = list_partitions(f"{REMOTE}/wds/{{00000..00002}}.tar", StorageOptions.from_s3(s3))
    assert [p.uri for p in parts] == [f"{REMOTE}/wds/0000{i}.tar" for i in range(3)]
    # Credentials travel beside a partition, never in it (partitions are fingerprinted).
    assert "secret" not in json.dumps([p.to_dict() for p in parts])


def test_a_later_listing_sees_objects_uploaded_since(data: Path, s3: S3Config) -> None:
    storage = StorageOptions.from_s3(s3)
    # Another client, as another process uploading new shards would be.
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **storage.for_uri("s3://"))
    fs.put(str(data / "wds" / "00000.tar"), f"{BUCKET}/growing/00000.tar")
    assert [p.id for p in list_partitions(f"s3://{BUCKET}/growing", storage)] == ["00000.tar"]
    fs.put(str(data / "wds" / "00001.tar"), f"{BUCKET}/growing/00001.tar")
    assert len(list_partitions(f"s3://{BUCKET}/growing", storage)) == 2


def test_s3_stamps_from_one_listing_equal_each_objects_own_info(data: Path, s3: S3Config) -> None:
    from cachebind.sources.base import _stamp, file_stamps, url_to_fs

    storage = StorageOptions.from_s3(s3)
    uris = [p.uri for p in list_partitions(f"{REMOTE}/wds", storage)]
    stamps = file_stamps(uris, storage)
    for uri in uris:
        fs, path = url_to_fs(uri, storage)
        assert stamps[uri] == _stamp(fs.info(path)) and stamps[uri].split(":")[1]  # the ETag


@pytest.fixture(scope="module")
def local_ray(s3: S3Config) -> Iterator[None]:
    """Started after the AWS variables were cleared, so its workers never see any."""
    stop_local_ray()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_embed_from_s3_into_a_table_on_s3_then_index_it(
    data: Path, s3: S3Config, local_ray: None, tmp_path: Path
) -> None:
    # What an operator writes: the table location and the endpoint in the TOML file.
    config = tmp_path / "cachebind.toml"
    config.write_text(
        f'[encoder]\npreset = "tiny"\n'
        f'[store]\nuri = "s3://{BUCKET}/cache"\n'
        f"[store.s3]\n"
        f'endpoint_url = "{s3.endpoint_url}"\nregion = "{REGION}"\n'
        f'access_key_id = "{s3.access_key_id}"\n'
        f'secret_access_key = "{s3.secret_access_key.get_secret_value()}"\n'
        # The encoder actors write the table's fragments to the bucket themselves.
        f'[embed]\nbatch_size = 8\nsink = "workers"\n'
        f'[index]\ndir = "{tmp_path / "index"}"\nuse_gpu = "no"\n'
    )
    settings = load_config(config)
    source = f"{REMOTE}/wds-bad"
    keys = [k for _, k, *_ in samples(f"{data}/wds-bad") if not k.startswith("bad_")]

    report = run_embed(source, settings, progress=False)
    assert report.rows_written == 24 and report.partitions_finished == 3
    assert report.sink == "workers" and sum(report.rows_by_node.values()) == 24
    assert report.errors_by_reason == {r: 1 for r in syn.bad_samples()}

    # The table, its errors and the report are on S3.
    table = CacheTable.open(settings.store)
    assert table.count() == 24
    assert str(table.dataset.uri) == f"s3://{BUCKET}/cache/images.lance"
    assert sorted(table.table.to_arrow()["key"].to_pylist()) == sorted(keys)
    vectors = table.vectors([row_id(k) for k in keys])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    errors = connect(settings.store).open_table(settings.store.errors_table_name).to_arrow()
    assert sorted(errors["key"].to_pylist()) == sorted(f"bad_{r}" for r in syn.bad_samples())
    assert report.report_path == f"s3://{BUCKET}/cache/images.report.json"
    fs = _fs(s3)
    saved = json.loads(fs.cat(f"{BUCKET}/cache/images.report.json"))
    assert saved["rows_written"] == 24 and saved["source"] == f"webdataset:{source}"
    assert len(fs.ls(f"{BUCKET}/cache/_reports")) == 1

    # Resuming reads the progress table on S3: every partition is done, nothing is written.
    again = run_embed(source, settings, progress=False)
    assert (again.rows_written, again.partitions_skipped) == (0, 3)
    assert CacheTable.open(settings.store).count() == 24

    # `cachebind index` on the S3 table, rows added in Ray tasks that open it by URI.
    assert cli_main(["--config", str(config), "index", "--shards", "2", "--json"]) == 0
    table = CacheTable.open(settings.store)
    loaded = indexing.load_current(settings.index.dir, table, use_gpu="no")
    assert loaded.manifest.table.uri == f"s3://{BUCKET}/cache/images.lance"
    assert loaded.manifest.shards == 2 and loaded.manifest.ntotal == 24
    ids = table.ids()[[0, 11, 23]]
    _, found = loaded.search(table.vectors(ids.tolist()), 3)
    np.testing.assert_array_equal(found[:, 0], ids)  # each row finds itself first

    # The service over the S3 table: search by a cached row's vector, and its thumbnail.
    with CachebindClient.in_process(settings) as client:
        assert client.index_info()["rows"] == 24
        query = input_item(None, table.vectors([int(ids[1])])[0])
        hits = client.search([query], k=3)["results"]
        assert hits[0]["id"] == int(ids[1])
        thumbnail = client.image(int(ids[1]))
        assert thumbnail[:3] == b"\xff\xd8\xff"  # a JPEG, read from the table on S3
