"""The embedding job over a messy collection (tars, a folder, parquet): every sample ends in the
table or the errors table exactly once, with the right reason; a decoder that crashes natively
costs its sample an errors row and the job finishes.

The crash is real: ``pillow_crash_plugin`` (test-only) registers an image format whose decoder
reads address 0, and a ``sitecustomize.py`` on the Python path of this module's Ray workers
imports it, so their sandbox workers meet a true segfault in Pillow's decode path. Production
code has no hook for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lancedb
import messy_corpus as messy
import pytest
from ray_local import stop_local_ray

from cachebind.config import EmbedConfig, EncoderConfig, SandboxConfig, Settings, StoreConfig
from cachebind.sources import synthetic as syn
from jobs.embed import run_embed

ray = pytest.importorskip("ray")

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python processes load the crashing Pillow plugin at start-up."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text("import pillow_crash_plugin  # noqa: F401\n")
    paths = [str(site), str(TESTS), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture(scope="module", autouse=True)
def ray_session(crash_env: dict[str, str]):
    """One local Ray whose workers (and their sandbox workers) inherit ``crash_env``."""
    stop_local_ray()  # its workers must inherit crash_env
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", crash_env["PYTHONPATH"])
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def settings(db: Path, **embed) -> Settings:
    return Settings(
        encoder=EncoderConfig(preset="tiny"),
        store=StoreConfig(uri=str(db)),
        embed=EmbedConfig(**{"batch_size": 4, **embed}),
        sandbox=SandboxConfig(memory_mb=300, timeout_s=60),
    )


def outcomes(s: Settings) -> tuple[Counter, list[dict]]:
    """(key, outcome) of every row of the table ("ok") and of the errors table (its reason)."""
    db = lancedb.connect(s.store.uri)
    rows = db.open_table(s.store.table).to_arrow().to_pylist()
    errors = db.open_table(s.store.errors_table_name).to_arrow().to_pylist()
    found = Counter((r["key"], "ok") for r in rows)
    found.update((e["key"], e["reason"]) for e in errors)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({e["id"] for e in errors}) == len(errors)
    return found, errors


def wanted(expected: messy.Outcomes) -> Counter:
    return Counter((key, o) for key, outs in expected.items() for o in outs)


def test_the_crashing_input_really_kills_a_process_that_decodes_it(
    crash_env: dict[str, str],
) -> None:
    code = (
        "import io, sys; from PIL import Image; "
        "Image.open(io.BytesIO(sys.stdin.buffer.read())).load()"
    )
    from pillow_crash_plugin import crashing_image

    done = subprocess.run(
        [sys.executable, "-c", code],
        input=crashing_image(),
        env=crash_env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGSEGV


@pytest.mark.slow
def test_a_messy_webdataset_accounts_for_every_sample_exactly_once(tmp_path: Path) -> None:
    source, expected = messy.webdataset(tmp_path)
    s = settings(tmp_path / "db")
    report = run_embed(str(source), s, progress=False)
    found, errors = outcomes(s)
    assert found == wanted(expected)
    assert report.rows_written + report.errors_written == messy.samples(expected) == 19
    assert report.partitions_finished == 3
    detail = {e["key"]: e["detail"] for e in errors if e["reason"] != "duplicate_key"}
    assert "crashed with signal SIGSEGV" in detail["boom"]
    duplicates = {
        (e["key"], e["shard"]): e["detail"] for e in errors if e["reason"] == "duplicate_key"
    }
    assert "sample 1 of 00000.tar" in duplicates["k1", "00000.tar"]  # names the kept one
    assert "sample" in duplicates["twice", "00000.tar"]
    ((shard, text),) = [(sh, d) for (k, sh), d in duplicates.items() if k == "k2"]
    other = {"00000.tar": "00001.tar", "00001.tar": "00000.tar"}[shard]
    assert f"a sample of {other}" in text

    # The same command again finds everything done and writes nothing twice.
    again = run_embed(str(source), s, progress=False)
    assert again.rows_written == again.errors_written == 0
    assert outcomes(s)[0] == found


@pytest.mark.slow
def test_a_messy_folder_and_parquet_account_for_every_sample_exactly_once(tmp_path: Path) -> None:
    # A 12000 x 12000 PNG of a few hundred bytes passes the pixel limit set here, and its
    # 432 MB of pixels pass the sandbox's 300 MiB: too_large, not a dead worker. An 8 GiB file
    # is over the job's byte budget (input.max_bytes, 64 MiB): too_large before the reader
    # reads a byte of it.
    folder, expected = messy.folder(tmp_path, bomb=syn.bomb_png(12_000, 12_000), huge=True)
    s = settings(tmp_path / "db-folder", max_image_pixels=200_000_000)
    report = run_embed(f"folder:{folder}?chunk_size=3", s, progress=False)
    found, errors = outcomes(s)
    assert found == wanted(expected)
    assert report.rows_written + report.errors_written == messy.samples(expected)
    assert report.non_samples == 1  # sub/y.txt, the caption of sub/y.jpg
    detail = {e["key"]: e["detail"] for e in errors}
    assert "SIGSEGV" in detail["crash"] and "300 MiB" in detail["big"]
    assert f"{messy.HUGE_BYTES:,} bytes, over the budget of {64 * 2**20:,}" in detail["huge"]

    table, expected = messy.parquet(tmp_path)
    s = settings(tmp_path / "db-parquet")
    report = run_embed(str(table), s, progress=False)
    assert outcomes(s)[0] == wanted(expected)
    assert report.rows_written + report.errors_written == messy.samples(expected) == 9
