"""The encoder benchmark runs end to end on CPU and checks ours against the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_encoder  # noqa: E402


def test_benchmark_prints_a_table_row_beside_the_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--preset", "tiny", "--batch-size", "2", "--iters", "2", "--warmup", "0"]
    bench_encoder.main([*args, "--peak-tflops", "1"])
    out = capsys.readouterr().out
    diff = next(line for line in out.splitlines() if line.startswith("# max |ours - reference|"))
    assert float(diff.split(":")[1]) <= 1e-5
    row = out.strip().splitlines()[-1].split("|")[1:-1]
    device, preset, dtype, batch, gflop, ours, ref, ratio, tflops, mfu = (c.strip() for c in row)
    assert (device, preset, dtype, batch) == ("cpu", "tiny", "fp32", "2")
    assert float(gflop) > 0 and float(ours) > 0 and float(ref) > 0 and ratio.endswith("x")
    assert float(tflops) > 0 and float(mfu.rstrip("%")) > 0
