"""The embedding job and the sharded index build on a real multi-node Ray cluster.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes on this machine, each its own
raylet with its own CPUs and object store; the table is on a temporary
path every node sees, which the job proves before it starts (:mod:`jobs.embed.shared`). The
encoder actors write the table's fragments where they run (the distributed sink). One cluster
for the module: it takes ~45 s to start on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray_local import stop_local_ray
from tables import make_images_table

import indexing
from cachebind.config import EmbedConfig, EncoderConfig, IndexConfig, Settings, StoreConfig
from cachebind.sources import synthetic as syn
from cachebind.store import CacheTable, connect, row_id
from indexing.mechanics.params import apply_search_params
from jobs.embed import run_embed

REPO = Path(__file__).resolve().parents[1]
NODE = {"object_store_memory": 96 * 2**20}
# Workers get 2 CPUs each, the head 1: two encoder actors (1 CPU each) and three decode tasks
# cannot all fit on one node, and losing a worker node still leaves room for the job.
WORKER_CPUS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    stop_local_ray()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **NODE})
    for _ in range(2):
        c.add_node(num_cpus=WORKER_CPUS, **NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def settings(db: Path) -> Settings:
    return Settings(
        encoder=EncoderConfig(preset="tiny"),
        store=StoreConfig(uri=str(db)),
        embed=EmbedConfig(batch_size=4, num_encoders=2, sink="workers"),
        index=IndexConfig(dir=db.parent / "index", use_gpu="no"),
    )


def assert_exactly_once(s: Settings, keys: list[str]) -> None:
    rows = connect(s.store).open_table(s.store.table).to_arrow()
    assert sorted(rows["key"].to_pylist()) == sorted(keys)  # nothing missing
    assert len(set(rows["id"].to_pylist())) == rows.num_rows  # nothing twice
    assert rows["id"].to_pylist() == [row_id(k) for k in rows["key"].to_pylist()]


def manifests(s: Settings) -> int:
    versions = Path(s.store.uri) / "images.lance" / "_versions"
    return len(list(versions.glob("*.manifest"))) if versions.is_dir() else 0


@pytest.mark.slow
def test_the_job_runs_on_several_nodes_and_the_driver_gets_descriptors(
    cluster: Cluster, tmp_path: Path
) -> None:
    keys = syn.write_webdataset(tmp_path / "wds", 48, per_shard=4)
    s = settings(tmp_path / "db")
    report = run_embed(str(tmp_path / "wds"), s, progress=False, flush_rows=8)
    assert report.nodes == 3  # the local table was proven seen by all three
    assert_exactly_once(s, keys)
    assert report.rows_written == 48 and report.partitions_finished == 12
    # Tasks and actors ran on more than one node, and each node's rows were written there.
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    used = set(report.partitions_by_node) | set(report.rows_by_node)
    assert len(used) > 1 and used <= alive, (report.partitions_by_node, report.rows_by_node)
    assert sum(report.rows_by_node.values()) == 48
    # The driver received descriptors: ~100 bytes a row, not the ~10 KB rows.
    assert report.driver_bytes_received / 48 < 1_000
    assert report.gc["tables"]["images"]["versions_kept"] == [CacheTable.open(s.store).version]


@pytest.mark.slow
def test_a_worker_node_lost_mid_job_costs_nothing(cluster: Cluster, tmp_path: Path) -> None:
    from ray.util.state import list_actors

    keys = syn.write_webdataset(tmp_path / "wds", 64, per_shard=4)
    s = settings(tmp_path / "db")
    workers = {n.node_id: n for n in cluster.worker_nodes}
    removed: list[str] = []

    job_done = threading.Event()

    def remove_an_encoders_node() -> None:
        # First a worker node that holds an encoder actor (the pool's actors live as long as
        # the job), then, as soon as rows are being committed, that node goes: the state API
        # can take seconds to answer on a busy machine, so it is not asked at the last moment.
        node = None
        deadline = time.monotonic() + 600
        while not job_done.is_set() and time.monotonic() < deadline:
            if node is None:
                # This cluster's own state API: without an address Ray asks the machine's
                # latest cluster, which a parallel test may have started.
                alive = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
                on_workers = [
                    a.node_id for a in alive if "MapWorker" in a.class_name and a.node_id in workers
                ]
                node = on_workers[0] if on_workers else None
            elif manifests(s) >= 2:  # rows are being committed: the job is flowing
                cluster.remove_node(workers[node])
                removed.append(node)
                return
            time.sleep(0.05)

    failures: list[BaseException] = []

    def remove_and_report() -> None:
        try:
            remove_an_encoders_node()
        except BaseException as e:  # seen by the assertion below, not lost with the thread
            failures.append(e)

    thread = threading.Thread(target=remove_and_report, daemon=True)
    thread.start()
    try:
        report = run_embed(str(tmp_path / "wds"), s, progress=False, flush_rows=4)
    finally:
        job_done.set()
        thread.join()
        cluster.add_node(num_cpus=WORKER_CPUS, **NODE)  # the module's next tests get three
        cluster.wait_for_nodes()
    assert not failures, failures
    assert removed, "no encoder actor ran on a worker node"
    assert manifests(s) > 0 and report.partitions_finished == 16
    assert_exactly_once(s, keys)


@pytest.mark.slow
def test_a_killed_driver_then_a_rerun_is_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    keys = syn.write_webdataset(tmp_path / "wds", 48, per_shard=4)
    db = tmp_path / "db"
    s = settings(db)
    config = tmp_path / "embed.toml"
    config.write_text(
        f'[encoder]\npreset = "tiny"\n[store]\nuri = "{db}"\n'
        "[embed]\nbatch_size = 4\nnum_encoders = 2\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBIND_")}
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.embed", str(tmp_path / "wds"), "--config", str(config),
         "--address", cluster.address, "--no-progress", "--flush-rows", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None and manifests(s) < 3:
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it could be killed"
        os.kill(job.pid, signal.SIGKILL)  # the cluster stays; Ray reclaims the job's workers
        job.wait(timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
    committed = connect(s.store).open_table("images").count_rows()
    assert 0 < committed < 48

    report = run_embed(str(tmp_path / "wds"), s, progress=False)
    assert report.rows_written == 48 - committed
    assert_exactly_once(s, keys)


def test_the_sharded_index_build_across_nodes_equals_a_single_build(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = make_images_table(tmp_path / "db", 3_000, 32, seed=0)
    table = CacheTable.open(store)
    key = "IVF16,Flat"
    single_cfg = IndexConfig(dir=tmp_path / "single", use_gpu="no")
    sharded_cfg = IndexConfig(dir=tmp_path / "sharded", use_gpu="no")
    single = indexing.build(
        CacheTable.open(store), single_cfg, indexing.BuildOptions(progress=False, index_key=key)
    )
    sharded = indexing.build(
        CacheTable.open(store),
        sharded_cfg,
        indexing.BuildOptions(progress=False, index_key=key, shards=5),
    )
    assert sharded["shards"] == 5 and sharded["table"] == single["table"]
    a = indexing.load_current(single_cfg.dir, table, use_gpu="no")
    b = indexing.load_current(sharded_cfg.dir, table, use_gpu="no")
    apply_search_params(b.index, single["search_params"])
    queries = table.vectors(table.ids()[::61].tolist())
    np.testing.assert_array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])
