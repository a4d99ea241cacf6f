"""The driver side of ``cachebind train``: plan the run, hand it to Ray Train, export the result.

Layout under ``train.output_dir``::

    <run_name>/start.pth           the starting {"model": ...} file (seeded, rewritten identically)
    <run_name>/loss.jsonl          one line per optimiser step (rank 0): step, epoch, lr, loss, ...
    <run_name>/loss.png            the curve, when matplotlib is installed
    <run_name>/imagebind_llm.pth   the result, released layout: what generate / serve load
    ray/<run_name>/checkpoint_*    Ray Train checkpoints (adapter.pth + state.pt)

Running the same command again resumes from the latest checkpoint (Ray Train finds it by
``run_name`` and ``storage_path``) and continues the same loss curve.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebind.config import Settings, TrainConfig
from cachebind.errors import CachebindError
from cachebind.raycluster import start_or_join_ray
from cachebind.train.build import write_start
from cachebind.train.data import steps_per_epoch
from cachebind.train.loop import Plan, train_loop
from cachebind.train.params import Phase
from cachebind.train.rows import RowSource
from cachebind.train.schedule import absolute_lr

DEFAULTS = {"pretrain": (1e-4, 0.05), "finetune": (1e-3, 0.02)}  # blr, weight decay (exps/*.sh)


class TrainError(CachebindError):
    """A training run that cannot start or did not finish."""


@dataclass
class TrainResult:
    phase: Phase
    output: Path
    steps: int
    effective_batch: int
    lr: float
    final_loss: float | None
    log_file: Path
    plot: Path | None
    checkpoint_dir: Path


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu != "auto":
        return cfg.use_gpu == "yes"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def make_plan(settings: Settings, phase: Phase, world: int) -> Plan:
    """The run's plan from the settings and the cache table's pinned version."""
    from cachebind.preprocess.views import trainable_views
    from cachebind.store import CacheTable
    from cachebind.store.schema import table_metadata, view_count

    cfg = settings.train
    llama_dir = cfg.llama_dir or settings.llm.llama_dir
    if llama_dir is None:
        raise TrainError("no base LLM: set train.llama_dir (or llm.llama_dir)")
    table = CacheTable.open(settings.store)
    crops = trainable_views(table_metadata(table.table.schema).get("views"))
    run_dir = Path(cfg.output_dir) / cfg.run_name
    source = RowSource(
        uri=str(table.dataset.uri),
        version=int(table.version),
        storage_options=table.storage_options,
        # embed --views: draw each row's F_M per epoch from its views too (train.use_views);
        # SPHINX's views are not: four of the five are quarters of the image.
        views=view_count(table.table.schema) if cfg.use_views and crops else 0,
    )
    n_rows = table.count()
    if phase == "finetune" and cfg.instructions is not None:
        source, n_rows = instruction_source(settings, table, run_dir)
    effective = cfg.batch_size * cfg.accum_iter * world
    spe = steps_per_epoch(n_rows, effective)
    if spe == 0:
        raise TrainError(f"{n_rows} rows are fewer than one global batch of {effective}")
    total = int(cfg.epochs * spe)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    blr, wd = DEFAULTS[phase]
    start = write_start(
        run_dir / "start.pth",
        Path(llama_dir),
        phase,
        in_dim=table.dim,
        init_checkpoint=cfg.init_checkpoint,
        variant=cfg.bind_variant,
        lora_rank=cfg.lora_rank,
        seed=cfg.seed,
    )
    return Plan(
        phase=phase,
        llama_dir=str(Path(llama_dir).resolve()),
        start_file=str(start.resolve()),
        source=source,
        n_rows=n_rows,
        steps_per_epoch=spe,
        total_steps=max(total, 1),
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        lr=cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr or blr, effective),
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else wd,
        batch_size=cfg.batch_size,
        accum_iter=cfg.accum_iter,
        max_words=cfg.max_words,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        data_cpus=cfg.data_cpus,
        output_dtype=cfg.output_dtype,
        log_file=str((run_dir / "loss.jsonl").resolve()),
        progress=cfg.progress,
    )


def instruction_source(settings: Settings, table, run_dir: Path) -> tuple[RowSource, int]:
    """Resolve ``train.instructions`` against the cache into ``<run>/instructions.lance``."""
    from cachebind.train.instruct import encoder_callbacks, load_items, resolve, write_examples

    if settings.train.instructions is None:
        raise ValueError("train.instructions is not set")
    path = Path(settings.train.instructions)
    items = load_items(path)
    examples = resolve(items, table, *encoder_callbacks(settings), base_dir=path.parent)
    uri, version = write_examples(examples, run_dir / "instructions.lance")
    columns = ("vector", "prompt", "answer")
    return RowSource(uri=str(Path(uri).resolve()), version=version, columns=columns), len(items)


def plot_losses(log_file: Path) -> Path | None:
    """``loss.png`` beside the log, if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("caption loss")
    fig.tight_layout()
    out = log_file.with_suffix(".png")
    fig.savefig(out)
    plt.close(fig)
    return out


def fit_on_ray(cfg: TrainConfig, loop: Callable[[Any], None], plan: object) -> Any:
    """Run ``loop(plan)`` on ``cfg.num_workers`` Ray Train workers under ``cfg.run_name``
    (resuming its latest checkpoint); returns the result of a run that ended with one."""
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from cachebind.train.raytrain import ContainedTorchTrainer

    use_gpu = _use_gpu(cfg)
    storage = (Path(cfg.output_dir) / "ray").resolve()
    trainer = ContainedTorchTrainer(
        # Ray hands train_loop_config to the loop unchanged; its annotations only allow a dict.
        loop,
        train_loop_config=plan,  # type: ignore[arg-type]
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise TrainError("training ended without a checkpoint")
    return result


def run_training(settings: Settings, phase: Phase) -> TrainResult:
    """Train ``phase`` on the cache table in ``settings.store``; resumable; returns the result."""
    cfg = settings.train
    start_or_join_ray(cfg.ray_address, log_to_driver=True)
    world = cfg.num_workers
    plan = make_plan(settings, phase, world)
    storage = (Path(cfg.output_dir) / "ray").resolve()
    result = fit_on_ray(cfg, train_loop, plan)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    output = run_dir / "imagebind_llm.pth"
    with result.checkpoint.as_directory() as d:
        tmp = output.with_name(".imagebind_llm.pth.tmp")
        shutil.copyfile(Path(d) / "adapter.pth", tmp)
        tmp.replace(output)
    log_file = Path(plan.log_file)
    losses = [json.loads(x)["loss"] for x in log_file.read_text().splitlines() if x]
    return TrainResult(
        phase=phase,
        output=output,
        steps=plan.total_steps,
        effective_batch=plan.batch_size * plan.accum_iter * world,
        lr=plan.lr,
        final_loss=losses[-1] if losses else None,
        log_file=log_file,
        plot=plot_losses(log_file) if losses else None,
        checkpoint_dir=storage / cfg.run_name,
    )
