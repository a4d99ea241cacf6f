"""Specification of training on Ray Train (CPU, gloo): two DDP workers end with the same
parameters as one worker accumulating the same global batch; a run whose training process is
killed mid-epoch resumes from its latest checkpoint and ends exactly where the uninterrupted run
ends, with the same loss curve; running the same command again finds the finished run; the
result is the released layout and loads for generation unchanged. Every run here trains while
another Ray cluster is the machine's latest, as on a machine where someone ran ``ray start``: Ray
Train's own liveness check used to ask that cluster about this run and tear the run down."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from ray_kill import MANAGER_SNAPSHOT, kill_after_a_checkpoint
from ray_local import use_local_ray
from train_fixtures import caption_table, tiny_llama, train_settings

from cachebind.config import LLMConfig
from cachebind.inject.generate import load_generator
from cachebind.train import loop
from cachebind.train.trainer import TrainResult, make_plan, run_training

# 24 rows, global batch 4: 6 steps an epoch, 4 epochs; checkpoints every 4 steps (mid-epoch).
COMMON = dict(batch_size=2, epochs=4.0, checkpoint_every=4)
STEPS = 24


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, another_ray_is_current):
    root = tmp_path_factory.mktemp("train")
    llama = tiny_llama(root / "llm")
    store = caption_table(root / "db", n=24)
    use_local_ray(num_cpus=4)
    return root, llama, store


def settings_for(inputs, **train):
    root, llama, store = inputs
    return train_settings(root, store, llama, **{**COMMON, **train})


@pytest.fixture(scope="module")
def one_worker(inputs) -> TrainResult:
    settings = settings_for(inputs, num_workers=1, accum_iter=2, run_name="one")
    return run_training(settings, "pretrain")


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log_lines(path)]


@pytest.mark.slow
def test_two_workers_end_where_one_worker_with_accumulation_ends(inputs, one_worker):
    root, llama, _ = inputs
    one = one_worker
    two = run_training(
        settings_for(inputs, num_workers=2, accum_iter=1, run_name="two"), "pretrain"
    )
    assert two.effective_batch == one.effective_batch == 4 and two.steps == one.steps == STEPS
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


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_and_ends_where_the_whole_run_ends(inputs, one_worker):
    settings = settings_for(inputs, num_workers=1, accum_iter=2, run_name="killed", max_failures=1)
    out = Path(settings.train.output_dir)
    log, snapshot = out / "killed" / "loss.jsonl", out / "ray" / "killed" / MANAGER_SNAPSHOT
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(out=run_training(settings, "pretrain")), daemon=True
    )
    thread.start()
    resumed_at, before = kill_after_a_checkpoint(log, snapshot, thread)
    assert 4 <= resumed_at <= len(before) < STEPS, (resumed_at, before)
    thread.join(timeout=900)  # the restarted run's own time, which a busy machine stretches
    assert not thread.is_alive(), "the resumed run did not finish"
    killed = result["out"]
    assert isinstance(killed, TrainResult)
    after = log_lines(log)
    assert [json.loads(x)["step"] for x in after] == list(range(1, STEPS + 1))
    # Resumed at the checkpoint, not restarted: the lines up to it are the killed run's own.
    assert after[:resumed_at] == before[:resumed_at]
    assert losses(log) == losses(one_worker.log_file)  # the same loss curve, continued
    a, b = adapter(killed.output), adapter(one_worker.output)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # The same command again finds the finished run in its checkpoints: nothing is redone.
    again = run_training(settings, "pretrain")
    assert log_lines(log) == after
    assert all(torch.equal(v, a[k]) for k, v in adapter(again.output).items())


@pytest.mark.slow
def test_finetune_from_stage_one_on_instructions_trains_only_stage_two_tensors(inputs, one_worker):
    root, llama, _ = inputs
    items = [
        {"image": f"img-{i}", "conversations": [{"value": "What colour is it?"},
                                                {"value": f"It is colour {i}."}]}
        for i in range(8)
    ]  # fmt: skip
    (root / "instructions.json").write_text(json.dumps(items))
    settings = settings_for(
        inputs, run_name="stage2", init_checkpoint=str(one_worker.output), max_steps=2,
        instructions=str(root / "instructions.json"), epochs=1.0, checkpoint_every=2,
    )  # fmt: skip
    result = run_training(settings, "finetune")
    assert result.steps == 2 and len(losses(result.log_file)) == 2
    stage1, stage2 = adapter(one_worker.output), adapter(result.output)
    assert set(stage1) < set(stage2)  # stage 1's tensors ride along, as in the released 7B.pth
    for key in stage1:  # frozen in stage 2: bridge, prefix_query, gates unchanged
        assert torch.equal(stage1[key], stage2[key]), key
    start = adapter(root / "train" / "stage2" / "start.pth")
    lora_l2 = [k for k in stage2 if "lora_" in k and k.endswith("_l2.weight")]
    assert lora_l2 and all(not torch.equal(stage2[k], start[k]) for k in lora_l2)
    generator = load_generator(
        LLMConfig(llama_dir=llama, adapter_checkpoint=result.output, device="cpu", dtype="float32")
    )
    config = generator.load_report.config
    assert config.lora_rank == 16 and config.w_bias and not generator.load_report.unused


def test_epochs_read_together_are_the_rows_of_epochs_read_one_at_a_time(inputs, monkeypatch):
    # A small table's epochs share one Ray Data read (loop.ROWS_PER_READ): the rows of every
    # step, from a mid-epoch start as a resumed run has, are those of reading epoch by epoch.
    settings = settings_for(inputs, num_workers=1, accum_iter=2, run_name="rows")
    plan = make_plan(settings, "pretrain", world=1)

    def read(start: int) -> list[tuple[int, list[list[float]]]]:
        return [
            (step, [v.tolist() for rows in group for v in rows["vector"]])
            for step, group in loop.scheduled_rows(plan, 0, 1, start)
        ]

    together = read(5)
    assert [step for step, _ in together] == list(range(5, STEPS))
    monkeypatch.setattr(loop, "ROWS_PER_READ", 1)
    assert read(5) == together
