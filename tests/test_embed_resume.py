"""A driver killed with SIGKILL mid-job, then started again with the same command, ends with
every good sample (and every error) exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import pytest

from cachebind.sources import synthetic as syn
from cachebind.store import row_id

REPO = Path(__file__).resolve().parents[1]


def embed_command(source: Path, config: Path) -> list[str]:
    return [
        sys.executable, "-m", "jobs.embed", str(source), "--config", str(config),
        "--no-progress", "--flush-rows", "2",
    ]  # fmt: skip


def committed_rows(db: Path) -> int:
    """Rows the job has committed to its images table so far (0 before it exists)."""
    try:
        return lancedb.connect(str(db)).open_table("images").count_rows()
    except (ValueError, FileNotFoundError, OSError):
        return 0


def table_versions(db: Path) -> int:
    """How many versions the images table has: a listing, far cheaper than opening the table
    (the poll below runs for the whole start-up of the job, on the CPU the job needs)."""
    try:
        return sum(1 for name in os.listdir(db / "images.lance" / "_versions")
                   if name.endswith(".manifest"))  # fmt: skip
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkilled_driver_resumes_to_exactly_once(tmp_path: Path) -> None:
    bad = syn.bad_samples()
    keys = syn.write_webdataset(tmp_path / "wds", 40, per_shard=5, bad=bad)
    db = tmp_path / "db"
    config = tmp_path / "embed.toml"
    config.write_text(
        f'[encoder]\npreset = "tiny"\n[store]\nuri = "{db}"\n[embed]\nbatch_size = 2\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBIND_")}
    env["RAY_ADDRESS"] = ""  # a local Ray of its own, never a cluster found in the environment
    # Its own session: the driver and the Ray processes it starts form one process group.
    job = subprocess.Popen(
        embed_command(tmp_path / "wds", config),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill once rows are committed (a version count would also count the table's creation
        # and its metadata updates, which commit no row).
        # Rows are counted only when a new version appears: every commit makes one.
        deadline, seen = time.monotonic() + 300, 0
        while time.monotonic() < deadline and job.poll() is None:
            versions = table_versions(db)
            if versions != seen:
                seen = versions
                if committed_rows(db) >= 4:
                    break  # at least two batches committed
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it could be killed"
        os.kill(job.pid, signal.SIGKILL)  # the driver only, as a crash would
        job.wait(timeout=10)
    finally:
        # Then tidy up the Ray processes that driver had started (same process group).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)

    images = lancedb.connect(str(db)).open_table("images")
    committed = images.count_rows()
    assert 0 < committed < 40

    rerun = subprocess.run(
        embed_command(tmp_path / "wds", config), cwd=REPO, env=env, timeout=150,
        capture_output=True, text=True,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    rows = lancedb.connect(str(db)).open_table("images").to_arrow()
    assert sorted(rows["key"].to_pylist()) == sorted(keys)  # nothing missing
    assert len(set(rows["id"].to_pylist())) == rows.num_rows == 40  # nothing twice
    assert rows["id"].to_pylist() == [row_id(k) for k in rows["key"].to_pylist()]
    errors = lancedb.connect(str(db)).open_table("images_errors").to_arrow()
    assert sorted(errors["reason"].to_pylist()) == sorted(bad)
