"""The GPU modes of the benchmarks, run on the CPU: the code a GPU session will run works.

Time on a borrowed GPU is short (benchmarks/gpu_suite.sh runs them all in one call), so a mode
that fails there costs the session its figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_index  # noqa: E402


def test_exact_search_mode_finds_every_query_row_first(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--gpu", "--device", "cpu", "--rows", "5000", "--batch", "32", "--repeats", "2"]
    bench_index.main(args)
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and result["rows"] == 5000 and result["batch"] == 32
    assert result["self_found_at_rank_1"] == 1.0
    assert result["p50_ms"] > 0 and result["qps"] > 0


def test_the_gpu_suite_is_a_valid_script_naming_existing_benchmarks() -> None:
    import subprocess

    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    subprocess.run(["bash", "-n", str(suite)], check=True)  # parses
    text = suite.read_text()
    for script in ("bench_encoder.py", "bench_index.py", "bench_generate.py"):
        assert f"benchmarks/{script}" in text
        assert (suite.parent / script).exists()


def test_decode_mode_runs_a_small_llama_on_the_cpu() -> None:
    import argparse

    import bench_generate

    from cachebind.inject.model import AdapterLlamaConfig

    cfg = AdapterLlamaConfig(
        dim=64, n_layers=2, n_heads=4, vocab_size=300, ffn_hidden=128, lora_rank=4,
        query_layer=2, bind_in_dim=32, bind_hidden=64,
    )  # fmt: skip
    result = bench_generate.bench_gpu(argparse.Namespace(tokens=4), cfg=cfg, device="cpu")
    assert result["device"] == "cpu" and result["decode_tokens_per_s"] > 0
    assert result["ms_per_token"] > 0
    assert {"weights_gb", "bandwidth_bound_ms_per_token_h100"} <= set(result)  # 0.0 GB: tiny


def test_serving_mode_batches_a_7b_shaped_model_built_small_on_the_cpu(tmp_path) -> None:
    import bench_generate_serve as serve_mode

    from cachebind.inject.model import AdapterLlamaConfig
    from cachebind.inject.scheduler import Scheduler

    cfg = AdapterLlamaConfig(
        dim=64, n_layers=2, n_heads=4, ffn_hidden=172, query_layer=2, bind_hidden=128
    )
    gen = serve_mode.gpu_generator(tmp_path, cfg, device="cpu")
    sched = Scheduler(gen, max_batch=4, max_queue=4)
    try:
        one = serve_mode.batched_request(sched, tokens=6)
        run = serve_mode.run_streams(3, one, np.ones((2, cfg.bind_in_dim), dtype=np.float32))
    finally:
        sched.close()
    assert run["tokens"] == 18 and run["tokens_per_s"] > 0 and run["ttft_p99_s"] > 0


def test_the_ceiling_benchmark_runs_as_the_gpu_runbook_calls_it_small_on_the_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import bench_generate_ceiling

    small = ["--dim", "64", "--layers", "2", "--heads", "4", "--streams", "2", "--tokens", "4"]
    bench_generate_ceiling.main([*small, "--no-http", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["ceiling"]["1"] > 0 and result["ceiling"]["2"] > 0
    scheduler = result["scheduler"]
    assert scheduler["1"]["tokens"] == 4 and scheduler["2"]["tokens"] == 8  # EOS ignored
    assert result["summary"]["scheduler"]["of_ceiling"] > 0
    # A run this small may be under the thread clocks' reach: a figure or None, never a crash.
    of_cpu = result["summary"]["scheduler"]["of_ceiling_cpu"]
    assert of_cpu is None or of_cpu > 0
    assert "http" not in result
