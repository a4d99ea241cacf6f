"""The per-worker training loop that Ray Train runs (``TorchTrainer(train_loop_per_worker)``).

Every worker loads the start file through ``inject.load``, freezes all but the phase's set and
wraps the loss in DDP (gloo on CPU, NCCL on GPUs; ``ray.train.torch.prepare_model``). Optimiser
step ``s`` (0-based over the whole run) reads the micro-batches ``data.worker_offsets`` assigns
it, sets the release's lr and steps. Every ``checkpoint_every`` steps and at the end, rank 0
writes a Ray Train checkpoint: ``adapter.pth`` (released layout, loadable as it is) and
``state.pt`` (trainable tensors, AdamW state, step), and every rank reports. A restarted run
finds the latest checkpoint (``ray.train.get_checkpoint``), restores it and carries on at the
next step with the rows that step would have had: the loss curve continues exactly.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cachebind.train.data import collate_rows, epoch_order, view_choices, worker_offsets
from cachebind.train.export import save_released
from cachebind.train.params import Phase, set_trainability
from cachebind.train.rows import RowSource, stream_rows
from cachebind.train.schedule import learning_rate, set_lr
from cachebind.train.step import LossModule, make_optimizer, optimizer_step


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs (picklable: it travels as ``train_loop_config``)."""

    phase: Phase
    llama_dir: str
    start_file: str
    source: RowSource
    n_rows: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_epochs: float
    lr: float
    min_lr: float
    weight_decay: float
    batch_size: int
    accum_iter: int
    max_words: int
    seed: int
    checkpoint_every: int
    data_cpus: float
    output_dtype: str
    log_file: str
    progress: bool
    max_grad_norm: float | None = None
    """The release clips no gradients."""


def all_mean(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def restore(optimizer: torch.optim.Optimizer, trainable: dict) -> int:
    """Load the latest Ray Train checkpoint, if any; returns the step to start at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (a killed run logged steps its checkpoint does not hold)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def report_checkpoint(
    optimizer: torch.optim.Optimizer,
    trainable: dict[str, torch.nn.Parameter],
    step: int,
    metrics: dict,
    export: Callable[[Path], object],
) -> None:
    """Every rank reports ``metrics``; rank 0 with a checkpoint: ``state.pt`` (trainable
    tensors, optimiser state, step) and what ``export(directory)`` writes beside it."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {
            "trainable": {k: p.detach().cpu() for k, p in trainable.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
        }
        torch.save(state, Path(d) / "state.pt")
        export(Path(d))
        # Ray Train persists the directory and only then counts it as a checkpoint (atomic).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class Schedule(Protocol):
    """What ``scheduled_rows`` reads of a plan (this module's ``Plan`` and the tokens plan)."""

    @property
    def source(self) -> RowSource: ...
    @property
    def n_rows(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def accum_iter(self) -> int: ...
    @property
    def data_cpus(self) -> float: ...


ROWS_PER_READ = 8192
"""Epochs are read by one Ray Data dataset until it holds this many rows: a dataset costs
about 0.1 s to plan and start, which a small table's epoch of a few steps would pay every
epoch (120 epochs of 12 steps: 12 s of a 70 s run). A large table reads an epoch at a time."""


def _epoch_offsets(
    plan: Schedule, rank: int, world: int, step: int
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The offsets (and view choices) worker ``rank`` reads from optimiser step ``step`` to
    the end of its epoch or of the run, and how many steps that is."""
    epoch, first = divmod(step, plan.steps_per_epoch)
    order = epoch_order(plan.n_rows, plan.seed, epoch)
    offsets = worker_offsets(
        order,
        rank=rank,
        world=world,
        micro_batch=plan.batch_size,
        accum=plan.accum_iter,
        first_step=first,
    )
    steps = min(plan.steps_per_epoch - first, plan.total_steps - step)
    offsets = offsets[: steps * plan.accum_iter * plan.batch_size]
    choices = None
    if plan.source.views:  # the epoch's augmented view of each row (embed --views)
        choices = view_choices(plan.n_rows, plan.seed, epoch, plan.source.views)[offsets]
    return offsets, choices, steps


def scheduled_rows(
    plan: Schedule, rank: int, world: int, start: int
) -> Iterator[tuple[int, list[dict[str, np.ndarray]]]]:
    """Yield (step, [rows] * accum_iter) from optimiser step ``start`` to the end: the rows
    ``data.worker_offsets`` assigns this worker, whatever model they train."""
    step = start
    while step < plan.total_steps:
        # Whole steps per epoch (micro-batch multiples): epochs concatenate without a seam.
        parts: list[np.ndarray] = []
        choice_parts: list[np.ndarray] = []
        end = step
        while end < plan.total_steps and sum(len(p) for p in parts) < ROWS_PER_READ:
            offsets, choices, steps = _epoch_offsets(plan, rank, world, end)
            parts.append(offsets)
            if choices is not None:
                choice_parts.append(choices)
            end += steps
        views = np.concatenate(choice_parts) if choice_parts else None
        group = []
        for rows in stream_rows(
            plan.source, np.concatenate(parts), plan.batch_size, plan.data_cpus, views
        ):
            group.append(rows)
            if len(group) == plan.accum_iter:
                yield step, group
                group, step = [], step + 1


def micro_batches(plan: Plan, tok: Any, rank: int, world: int, start: int):
    """Yield (step, [Batch] * accum_iter) from optimiser step ``start`` to the end."""
    for step, group in scheduled_rows(plan, rank, world, start):
        yield step, [collate_rows(tok, rows, plan.max_words) for rows in group]


def progress_bar(total: int, start: int, desc: str, enabled: bool) -> Any:
    """Rank 0's tqdm bar over the optimiser steps (None when ``enabled`` is False)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, mininterval=2.0, unit="step")


def advance(bar: Any, loss: float, lr: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")


@dataclass(frozen=True)
class Worker:
    """This Ray Train worker: its rank, the world's size and its device."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls, seed: int) -> Worker:
        """The calling worker, its torch RNG seeded (every rank alike)."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        torch.manual_seed(seed)
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The frozen model's dtype: bfloat16 on GPUs (with bf16 autocast), else float32."""
        return torch.bfloat16 if self.cuda else torch.float32


class StepPlan(Schedule, Protocol):
    """What ``run_steps`` reads of a plan besides its rows' schedule (both plans have it)."""

    @property
    def lr(self) -> float: ...
    @property
    def min_lr(self) -> float: ...
    @property
    def warmup_epochs(self) -> float: ...
    @property
    def epochs(self) -> float: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def max_grad_norm(self) -> float | None: ...
    @property
    def log_file(self) -> str: ...
    @property
    def progress(self) -> bool: ...


def run_steps(
    worker: Worker,
    plan: StepPlan,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: dict[str, torch.nn.Parameter],
    steps: Iterator[tuple[int, list[Any]]],
    start: int,
    desc: str,
    export: Callable[[Path], object],
) -> None:
    """The optimiser steps from ``start`` (after ``restore``): each step's lr, its
    micro-batches (``steps`` yields them, each with a ``to(device)``) through
    ``optimizer_step``, the mean loss logged by rank 0 (``loss.jsonl``, progress bar), and
    ``report_checkpoint`` every ``checkpoint_every`` steps and at the end."""
    log = Path(plan.log_file)
    if worker.rank == 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        trim_log(log, start)
    bar = progress_bar(plan.total_steps, start, desc, worker.rank == 0 and plan.progress)
    global_batch = plan.batch_size * plan.accum_iter * worker.world
    autocast = torch.bfloat16 if worker.cuda else None
    started = time.perf_counter()
    for step, group in steps:
        # Random layers (LoRA's dropout) draw from a stream fixed by (seed, step, rank): a
        # resumed run's steps draw what the uninterrupted run's drew.
        torch.manual_seed(hash((plan.seed, step, worker.rank)) & 0x7FFF_FFFF)
        epoch = step / plan.steps_per_epoch
        lr = learning_rate(
            epoch,
            lr=plan.lr,
            min_lr=plan.min_lr,
            warmup_epochs=plan.warmup_epochs,
            epochs=plan.epochs,
        )
        set_lr(optimizer, lr)
        batches = [b.to(worker.device) for b in group]
        loss = optimizer_step(module, optimizer, batches, autocast, plan.max_grad_norm)
        loss = all_mean(loss, worker.device)
        done = step + 1
        metrics = {"step": done, "epoch": round(epoch, 6), "lr": lr, "loss": loss}
        if worker.rank == 0:
            elapsed = round(time.perf_counter() - started, 3)
            line = {**metrics, "samples": done * global_batch, "elapsed_s": elapsed}
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
            if bar is not None:
                advance(bar, loss, lr)
        if done % plan.checkpoint_every == 0 or done == plan.total_steps:
            report_checkpoint(optimizer, trainable, done, metrics, export)
    if bar is not None:
        bar.close()


def train_loop(plan: Plan) -> None:
    """``train_loop_per_worker``."""
    import ray.train.torch

    from cachebind.inject.load import load_adapter_llama

    worker = Worker.current(plan.seed)
    model, tok, _ = load_adapter_llama(
        Path(plan.llama_dir), Path(plan.start_file), device=worker.device, dtype=worker.dtype
    )
    model.train()
    trainable = set_trainability(model, plan.phase)
    optimizer = make_optimizer(trainable, plan.lr, plan.weight_decay)
    start = restore(optimizer, trainable)
    unused = model.cfg.query_layer < model.cfg.n_layers  # gates of plain layers get no grad
    module = ray.train.torch.prepare_model(
        LossModule(model), parallel_strategy_kwargs={"find_unused_parameters": unused}
    )
    dtype = getattr(torch, plan.output_dtype)
    run_steps(
        worker,
        plan,
        module,
        optimizer,
        trainable,
        micro_batches(plan, tok, worker.rank, worker.world, start),
        start,
        f"train {plan.phase}",
        lambda d: save_released(model, plan.phase, d / "adapter.pth", dtype),
    )
