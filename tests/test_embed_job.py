"""The embedding job end to end on a shared local Ray: every source kind, bad inputs recorded and
skipped, vectors equal to a single-process encoder, metadata, thumbnails, resume and re-run,
and a Ray worker killed mid-job."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import embed_settings
from PIL import Image
from ray_local import use_local_ray

from cachebind.config import EmbedConfig, EncoderConfig, Settings
from cachebind.encode import Encoder
from cachebind.modalities import Modality
from cachebind.preprocess import PREPROCESS_VERSION
from cachebind.preprocess.image import image_tensor, load_image
from cachebind.sources import synthetic as syn
from cachebind.store import CacheTable, EncoderMismatchError, row_id
from cachebind.store.table import vectors_to_numpy
from jobs.embed import plan_resources, run_embed

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for the module (start-up costs seconds); the job reuses it."""
    use_local_ray(num_cpus=2)


settings = embed_settings


def table_rows(s: Settings) -> dict:
    return CacheTable.open(s.store).table.to_arrow().to_pydict()


def errors_rows(s: Settings) -> dict:
    import lancedb

    return lancedb.connect(s.store.uri).open_table(s.store.errors_table_name).to_arrow().to_pydict()


def reference_vectors(images: list[bytes]) -> np.ndarray:
    """The same work in one process: decode, preprocess, encode, normalise."""
    encoder = Encoder.from_config(EncoderConfig(preset="tiny"), Settings().weights)
    batch = torch.stack([image_tensor(load_image(b)) for b in images])
    return F.normalize(encoder.encode(Modality.IMAGE, batch), dim=-1).numpy()


def test_webdataset_job_records_bad_inputs_and_resumes_exactly_once(tmp_path: Path) -> None:
    bad = syn.bad_samples()
    keys = syn.write_webdataset(tmp_path / "wds", 24, per_shard=8, bad=bad)
    s = settings(tmp_path / "db")

    # A first run stopped early (as a killed job would be), then the same command again.
    partial = run_embed(str(tmp_path / "wds"), s, limit=10, progress=False, flush_rows=4)
    assert partial.stopped_by_limit and 0 < partial.rows_written < 24
    report = run_embed(str(tmp_path / "wds"), s, progress=False)
    assert partial.rows_written + report.rows_written == 24

    rows = table_rows(s)
    assert sorted(rows["key"]) == sorted(keys)
    assert rows["id"] == [row_id(k) for k in rows["key"]] and len(set(rows["id"])) == 24
    assert rows["shard"][rows["key"].index("000010003")] == "00001.tar"

    errors = errors_rows(s)
    assert sorted(errors["reason"]) == sorted(bad)  # one of each class, with its reason
    assert sorted(errors["key"]) == sorted(f"bad_{r}" for r in bad)
    reasons = {**partial.errors_by_reason}
    for reason, n in report.errors_by_reason.items():
        reasons[reason] = reasons.get(reason, 0) + n
    assert reasons == {r: 1 for r in bad}

    # F_M in the table equals the single-process computation (fp16 storage).
    table = CacheTable.open(s.store)
    order = [row_id(k) for k in keys]
    got = table.vectors(order)
    want = reference_vectors([syn.image_bytes(i) for i in range(24)])
    np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=2e-3)
    assert table.dim == 64

    meta = table.metadata
    assert meta["encoder"]["preset"] == "tiny"
    assert meta["encoder"]["weights"] == "random-init:seed=0"
    assert meta["preprocess_version"] == str(PREPROCESS_VERSION)

    thumb = Image.open(io.BytesIO(rows["thumbnail"][0]))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256

    saved = json.loads(Path(report.report_path).read_text())
    assert saved["rows_written"] == report.rows_written
    assert set(saved["stages"]) == {"decode", "encode", "write"}
    assert saved["stages"]["encode"]["samples"] == report.rows_written

    # Idempotent: a third run finds every partition finished and writes nothing.
    again = run_embed(str(tmp_path / "wds"), s, progress=False)
    assert (again.rows_written, again.errors_written) == (0, 0)
    assert again.partitions_skipped == again.partitions_total == 3
    assert CacheTable.open(s.store).count() == 24

    # The table belongs to this encoder: another one is refused before any work.
    other = s.model_copy(update={"encoder": EncoderConfig(preset="tiny", seed=1)})
    with pytest.raises(EncoderMismatchError, match="seed=1"):
        run_embed(str(tmp_path / "wds"), other, progress=False)


@pytest.mark.slow
def test_folder_parquet_and_cc3m_sources(tmp_path: Path) -> None:
    db = tmp_path / "db"
    folder_keys = syn.write_folder(tmp_path / "folder", 5)
    (tmp_path / "folder" / "wide.png").write_bytes(syn.image_bytes(7, (600, 300), "PNG"))
    s = settings(db, "folder", caption_embeddings=True)
    s.store.vector_dtype = "float32"
    report = run_embed(str(tmp_path / "folder"), s, progress=False)
    assert report.rows_written == 6
    rows = table_rows(s)
    assert sorted(rows["key"]) == sorted([*folder_keys, "wide"])
    wide = rows["key"].index("wide")
    assert (rows["width"][wide], rows["height"][wide]) == (600, 300)
    assert Image.open(io.BytesIO(rows["thumbnail"][wide])).size == (256, 128)
    assert rows["caption"][rows["key"].index("img0002")] == "caption 2"
    text_column = CacheTable.open(s.store).table.to_arrow()["text_vector"]
    assert text_column.null_count == 1  # "wide" has no caption: no text vector, no failure
    text = vectors_to_numpy(text_column.drop_null())
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)

    parquet_keys = syn.write_parquet(tmp_path / "pq" / "00000.parquet", 7, row_group_size=4)
    s = settings(db, "parquet", thumbnails=False)
    assert run_embed(str(tmp_path / "pq"), s, progress=False).rows_written == 7
    assert sorted(table_rows(s)["key"]) == parquet_keys
    # Past embed.max_row_group_bytes a row group is refused unread, each of its rows an error
    # (in this table's own errors table: the next collection's keys are its own to write).
    s = settings(db, "parquet_budget", thumbnails=False, max_row_group_bytes=1000)
    report = run_embed(str(tmp_path / "pq"), s, progress=False)
    assert (report.rows_written, report.errors_by_reason) == (0, {"too_large": 7})

    cc3m_keys = syn.write_cc3m(tmp_path / "cc3m.tsv", tmp_path / "cc3m", 8, missing=(2,))
    s = settings(db, "cc3m")
    spec = f"cc3m:{tmp_path}/cc3m.tsv?images={tmp_path}/cc3m&samples_per_shard=10"
    report = run_embed(spec, s, progress=False)
    assert (report.rows_written, report.errors_by_reason) == (7, {"missing": 1})
    rows = table_rows(s)
    assert sorted(rows["key"]) == cc3m_keys
    assert rows["url"][rows["key"].index("000000005")] == "http://example.com/cc3m/5.jpg"


def test_plan_follows_resources_and_overrides() -> None:
    cpu = plan_resources({"CPU": 16.0}, EmbedConfig())
    assert (cpu.num_encoders, cpu.encoder_gpus, cpu.pixel_dtype) == (1, 0.0, "float32")
    assert cpu.encoder_cpus == 8 and cpu.num_readers == 8
    gpu = plan_resources({"CPU": 64.0, "GPU": 8.0}, EmbedConfig())
    assert (gpu.num_encoders, gpu.encoder_gpus, gpu.pixel_dtype) == (8, 1.0, "float16")
    assert gpu.batch_size == 256
    custom = plan_resources({"CPU": 8.0, "GPU": 2.0}, EmbedConfig(batch_size=64, num_encoders=1))
    assert (custom.num_encoders, custom.batch_size) == (1, 64)


def _children(pid: int) -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def our_ray_workers(prefix: str) -> list[int]:
    """Processes of *this* test's Ray (descendants of this process) whose title starts with
    ``prefix``: other Ray instances on the machine are left alone."""
    tree, found, todo = _children(os.getpid()), [], [os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(prefix):
                found.append(child)
    return found


@pytest.mark.parametrize("sink", ["driver", "workers"])
def test_killed_ray_workers_lose_nothing(tmp_path: Path, sink: str) -> None:
    """Encoder actors and decode tasks SIGKILLed mid-job; with the workers sink the killed
    actor may have written fragments the driver never sees, or replays that it drops."""
    keys = syn.write_webdataset(tmp_path / "wds", 48, per_shard=4)
    s = settings(tmp_path / "db", batch_size=2, sink=sink)
    versions = tmp_path / "db" / "images.lance" / "_versions"
    killed: list[tuple[str, int]] = []
    committed_at_kill: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            # Wait for the first committed batch: the encoder actor is working by then.
            if versions.is_dir() and len(list(versions.glob("*.manifest"))) >= 2:
                for prefix in ("ray::MapWorker(MapBatches(EncodeActor))", "ray::MapBatches("):
                    for pid in our_ray_workers(prefix):
                        os.kill(pid, signal.SIGKILL)
                        killed.append((prefix, pid))
                committed_at_kill.append(CacheTable.open(s.store).count())
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = run_embed(str(tmp_path / "wds"), s, progress=False, flush_rows=2)
    thread.join()
    assert any("EncodeActor" in prefix for prefix, _ in killed), killed
    assert committed_at_kill[0] < 48  # the kill landed mid-job
    rows = table_rows(s)
    assert sorted(rows["key"]) == sorted(keys)  # complete ...
    assert len(set(rows["id"])) == len(rows["id"])  # ... and no duplicates
    assert report.rows_written == 48 and report.partitions_finished == 12
    assert report.sink == sink


def test_a_resumed_job_reads_again_a_shard_replaced_since_it_finished(tmp_path: Path) -> None:
    syn.write_webdataset(tmp_path / "wds", 12, per_shard=6)
    s = settings(tmp_path / "db")
    assert run_embed(str(tmp_path / "wds"), s, progress=False).rows_written == 12
    # The collection is re-exported: the same shard names now hold 8 samples each.
    keys = syn.write_webdataset(tmp_path / "wds", 16, per_shard=8)
    report = run_embed(str(tmp_path / "wds"), s, progress=False)
    assert report.partitions_skipped == 0 and report.rows_written == 4
    assert report.rows_skipped == 12  # already in the table: neither decoded nor written again
    assert sorted(table_rows(s)["key"]) == sorted(keys)  # every sample once, none twice


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pixel_batches_are_read_from_arrow_without_a_python_round_trip(dtype: str) -> None:
    import pyarrow as pa

    from jobs.embed.decode import PIXELS
    from jobs.embed.encode import pixel_batch

    tensors = np.random.default_rng(0).standard_normal((5, *PIXELS)).astype(dtype)
    rows = [t.tobytes() for t in tensors]
    chunked = pa.chunked_array([pa.array(rows[:2], pa.binary()), pa.array(rows[2:], pa.binary())])

    whole = pixel_batch(pa.array(rows, pa.binary()), np.arange(5), dtype)
    np.testing.assert_array_equal(whole, tensors)
    assert not whole.flags.owndata  # a view of Arrow's buffer, not a copy
    np.testing.assert_array_equal(pixel_batch(chunked, np.arange(5), dtype), tensors)
    np.testing.assert_array_equal(
        pixel_batch(chunked, np.array([0, 3, 4]), dtype), tensors[[0, 3, 4]]
    )
    sliced = pa.array(rows, pa.large_binary()).slice(1, 3)  # a non-zero array offset
    np.testing.assert_array_equal(pixel_batch(sliced, np.arange(3), dtype), tensors[1:4])


def test_an_encoder_actor_without_extra_encoders_does_not_import_transformers() -> None:
    """transformers costs every actor seconds of CPU at start-up; only extra encoders use it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cachebind.config import EncoderConfig, Settings\n"
        "from jobs.embed.encode import EncodeActor\n"
        "EncodeActor(EncoderConfig(preset='tiny'), Settings().weights, 'float32', False, 1)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


LATE_COORDINATOR = """
import logging
from ray.data._internal.logging import configure_logging

configure_logging()
try:
    raise TimeoutError("the coordinator answered late")
except TimeoutError:
    name = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"
    logging.getLogger(name).warning("coordinator late", exc_info=True)
logging.getLogger("ray.data._internal.execution.streaming_executor").warning("other warning")
"""


def test_a_late_autoscaling_coordinator_prints_no_traceback_on_the_console(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import jobs.embed.plan

    config = Path(jobs.embed.plan.__file__).with_name("ray_data_logging.yaml")
    env = {**os.environ, "RAY_DATA_LOGGING_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-c", LATE_COORDINATOR],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "other warning" in console  # Ray Data's other warnings still reach the console
    assert "Traceback" not in console and "coordinator late" not in console
