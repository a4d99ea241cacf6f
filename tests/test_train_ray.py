"""Specification of training on Ray Train (CPU, gloo): two DDP workers end with the same
parameters as one worker accumulating the same global batch; the result is the released layout
and loads for generation unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from train_fixtures import caption_table, tiny_llama, train_settings

from cachebind.config import LLMConfig
from cachebind.inject.generate import load_generator
from cachebind.train.trainer import run_training


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    llama = tiny_llama(root / "llm")
    store = caption_table(root / "db", n=24)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield root, llama, store
    ray.shutdown()


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_two_workers_end_where_one_worker_with_accumulation_ends(inputs):
    root, llama, store = inputs
    common = dict(batch_size=2, max_steps=3, checkpoint_every=2)
    two = run_training(
        train_settings(root, store, llama, num_workers=2, accum_iter=1, run_name="two", **common),
        "pretrain",
    )
    one = run_training(
        train_settings(root, store, llama, num_workers=1, accum_iter=2, run_name="one", **common),
        "pretrain",
    )
    assert two.effective_batch == one.effective_batch == 4 and two.steps == one.steps == 3
    a, b = adapter(two.output), adapter(one.output)
    start = adapter(root / "train" / "one" / "start.pth")
    assert set(a) == set(b) == set(start)  # trainable keys only: bridge, prefix_query, gates
    assert all(k.startswith(("image_bind_", "prefix_query", "llama.")) for k in a)
    assert all("gate" in k for k in a if k.startswith("llama."))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(a[k], start[k]) for k in a if "gate" in k)  # gates opened
    assert losses(two.log_file) == pytest.approx(losses(one.log_file), rel=1e-5)

    # The released layout: generation loads it as it loads 7B.pth.
    generator = load_generator(
        LLMConfig(llama_dir=llama, adapter_checkpoint=one.output, device="cpu", dtype="float32")
    )
    report = generator.load_report
    assert report.config.lora_rank == 0 and not report.config.w_bias and not report.unused
