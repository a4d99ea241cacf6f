"""The patch-token training benchmark runs end to end on CPU and reports both paths."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_tokens  # noqa: E402


def test_the_benchmark_times_the_cached_and_the_encoder_path_of_one_step() -> None:
    out = bench_tokens.run(["--preset", "tiny", "--batch-size", "1", "--iters", "1"])
    assert out["device"] == "cpu" and out["tokens_per_image"] == 256
    assert out["token_bytes_per_row"] == 256 * 64 * 2  # tiny: 64-wide trunk, float16
    assert float(out["samples_per_s_cache"]) > 0 and float(out["samples_per_s_encoder"]) > 0
