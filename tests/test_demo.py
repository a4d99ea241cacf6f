"""`cachebind demo`, as a newcomer runs it: the whole pipeline, end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachebind.config import StoreConfig
from cachebind.store import CacheTable


@pytest.mark.slow
def test_demo_runs_every_stage_and_says_it_has_no_real_weights(tmp_path: Path) -> None:
    env = {**os.environ, "CACHEBIND_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("CACHEBIND_CONFIG", None)
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "cachebind.cli", "demo", "--out", str(out), "--images", "40"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    assert "RANDOMLY INITIALISED" in text and "cachebind weights download imagebind_huge" in text
    assert "CC BY-NC 4.0" in text
    headings = ("text query", "audio query", "weighted mix", "video query", "point-cloud query")
    for heading in (*headings, "cosine(F_M, F~_M)", "generation"):
        assert heading in text
    assert "stopped cleanly" in text
    # It says how to serve what it built, and a successful run shows no traceback.
    serve = [
        line.strip() for line in text.splitlines() if line.strip().startswith("cachebind serve")
    ]
    assert len(serve) == 1 and f"--index-dir {out / 'index'}" in serve[0]
    assert "--llama-dir" in serve[0] and "--adapter-checkpoint" in serve[0]
    assert "Traceback" not in done.stdout + done.stderr
    # Five neighbours per query, with captions from the generated collection.
    assert text.count("  5. score") == 5
    table = CacheTable.open(StoreConfig(uri=str(out / "lancedb")))
    assert table.count() == 40
    assert (out / "index" / "CURRENT").read_text().strip() == "v000001"
