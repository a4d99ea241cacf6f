"""The driver side of ``cachebind train llava-pretrain | llava-finetune``: plan, Ray Train,
LLaVA's outputs.

Layout under ``train.output_dir``::

    <run_name>/start.pth          the projector the run starts from (seeded, or init_projector)
    <run_name>/loss.jsonl         one line per optimiser step (rank 0), as ``train pretrain``
    <run_name>/loss.png           the curve, when matplotlib is installed
    <run_name>/mm_projector.bin   the projector, LLaVA's stage-1 layout (model.mm_projector.0/2.*)
    <run_name>/mixed_projector.pth   instead, with tokens_train.mix: SPHINX's projector
                                  (``bind.mixed.save_mixed_projector``; what ``cachebind
                                  serve --mixed-projector`` serves)
    <run_name>/llava-hf/          stage 2: a llava-hf directory (llava_dir's tower and files,
                                  the trained projector and LLM) that ``load_llava`` loads
    <run_name>/llava_instructions.lance   stage 2's examples resolved against the cache
    ray/<run_name>/checkpoint_*   Ray Train checkpoints (state.pt + mm_projector.bin)

Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from cachebind.bind.mixed import TokenSource
from cachebind.bind.projector import LlavaProjector
from cachebind.config import Settings
from cachebind.raycluster import start_or_join_ray
from cachebind.train.data import steps_per_epoch
from cachebind.train.rows import RowSource
from cachebind.train.tokens_data import min_length
from cachebind.train.tokens_instruct import instruction_source
from cachebind.train.tokens_loop import (
    MIXED_PROJECTOR_FILE,
    MM_PROJECTOR_FILE,
    TokensPlan,
    train_tokens_loop,
)
from cachebind.train.tokens_model import LlmSource, Stage, llm_source, make_projector
from cachebind.train.trainer import TrainError, TrainResult, fit_on_ray, plot_losses


def tokens_column(encoder: str) -> str:
    """The cache column of ``encoder``'s patch tokens."""
    return "patch_tokens" if encoder == "imagebind" else f"patch_tokens_{encoder}"


def token_source(table, encoder: str) -> TokenSource:
    """``encoder``'s tokens as the table records them: shape, hidden state and identity;
    refused when it has none."""
    try:
        record = table.tokens_record(encoder)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return TokenSource(encoder, record.patches, record.width, record.layer, record.identity)


def write_projector_start(
    path: Path,
    source: LlmSource,
    width: int,
    init: Path | None,
    seed: int,
    stage: Stage,
    mix: tuple[TokenSource, ...] = (),
    side: int = 0,
) -> Path:
    """The start projector (``init``'s mm_projector.bin, else in stage 2 the llava-hf
    directory's own, recorded as None, else a seeded fresh one), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if init is None and stage == "finetune":
        torch.save({"projector": None}, tmp)
        os.replace(tmp, path)
        return path
    projector: nn.Module = LlavaProjector(width, source.hidden, act=source.act, bias=source.bias)
    if init is not None:
        from cachebind.inject.llava_load import read_mm_projector, replace_projector

        have = {"multi_modal_projector." + k: v for k, v in projector.state_dict().items()}
        state = replace_projector(have, read_mm_projector(Path(init)), str(init))
        projector.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
    else:
        torch.manual_seed(seed)  # nn.Linear's own init, reproducible
        projector = make_projector(source, width, mix, side)
    state = {k: v.float().contiguous() for k, v in projector.state_dict().items()}
    torch.save({"projector": state}, tmp)
    os.replace(tmp, path)
    return path


def make_tokens_plan(settings: Settings, stage: Stage, world: int) -> TokensPlan:
    """The run's plan from the settings and the cache table's pinned version."""
    from cachebind.store import CacheTable

    cfg, tt = settings.train, settings.tokens_train
    source = llm_source(tt.llava_dir, tt.llama_dir)
    table = CacheTable.open(settings.store)
    mix = tuple(token_source(table, n) for n in tt.mix)
    if tt.lora_r and stage != "finetune":
        raise TrainError("tokens_train.lora_r is stage 2's (llava-finetune): stage 1 trains the "
                         "projector alone")  # fmt: skip
    if mix and (stage == "finetune" or tt.init_projector is not None):
        raise TrainError(
            "tokens_train.mix trains a fresh SPHINX projector in stage 1 only "
            "(no stage 2, no init_projector)"
        )
    first = token_source(table, mix[0].name if mix else tt.encoder)
    patches, width = first.patches, first.width
    side = (tt.mix_side or mix[0].side) if mix else 0
    if mix:
        patches = side * side  # the visual tokens an image becomes on the common grid
    elif source.vision_width is not None and source.vision_width != width:
        raise TrainError(
            f"the cache's {tokens_column(tt.encoder)} are {width} wide, {source.directory}'s "
            f"projector takes {source.vision_width}"
        )
    if tt.max_length < min_length(patches):
        raise TrainError(
            f"tokens_train.max_length {tt.max_length} cannot hold BOS, {patches} visual tokens "
            "and a caption token"
        )
    run_dir = Path(cfg.output_dir) / cfg.run_name
    column = tokens_column(mix[0].name if mix else tt.encoder)
    mix_columns = tuple(tokens_column(m.name) for m in mix)
    rows: RowSource
    if stage == "finetune":
        if source.kind != "llava" or tt.instructions is None:
            raise TrainError(
                "llava-finetune needs tokens_train.llava_dir (its tower goes into the output) "
                "and tokens_train.instructions"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        rows, n_rows = instruction_source(
            Path(tt.instructions), table, run_dir, column, patches * width
        )
    else:
        missing = table.dataset.count_rows(filter="caption IS NULL")
        if missing:
            raise TrainError(f"{missing} rows of the table have no caption to train on")
        n_rows = table.count()
        rows = RowSource(
            uri=str(table.dataset.uri),
            version=int(table.version),
            storage_options=table.storage_options,
            columns=(*(mix_columns or (column,)), "caption"),
        )
    global_batch = tt.pretrain_batch if stage == "pretrain" else tt.finetune_batch
    per_pass = cfg.batch_size * world
    if global_batch % per_pass:
        raise TrainError(
            f"global batch {global_batch} is not a multiple of batch_size {cfg.batch_size} x "
            f"{world} workers"
        )
    spe = steps_per_epoch(n_rows, global_batch)
    if spe == 0:
        raise TrainError(f"{n_rows} rows are fewer than one global batch of {global_batch}")
    scheduled = max(int(tt.epochs * spe), 1)  # the schedule's length, whatever max_steps says
    total = min(scheduled, cfg.max_steps) if cfg.max_steps is not None else scheduled
    warmup_steps = math.ceil(tt.warmup_ratio * scheduled)  # transformers' get_warmup_steps
    start = write_projector_start(
        run_dir / "start.pth", source, width, tt.init_projector, cfg.seed, stage, mix, side
    )
    return TokensPlan(
        stage=stage,
        llm=source,
        start_file=str(start.resolve()),
        source=rows,
        tokens_column=column,
        patches=patches,
        width=width,
        n_rows=n_rows,
        steps_per_epoch=spe,
        total_steps=total,
        epochs=scheduled / spe,
        warmup_epochs=warmup_steps / spe,
        lr=tt.pretrain_lr if stage == "pretrain" else tt.lora_lr if tt.lora_r else tt.finetune_lr,
        weight_decay=tt.weight_decay,
        max_grad_norm=tt.max_grad_norm,
        batch_size=cfg.batch_size,
        accum_iter=global_batch // per_pass,
        max_length=tt.max_length,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        data_cpus=cfg.data_cpus,
        output_dtype=cfg.output_dtype,
        log_file=str((run_dir / "loss.jsonl").resolve()),
        mix=mix,
        mix_columns=mix_columns,
        mix_side=side,
        progress=cfg.progress,
        lora_r=tt.lora_r,
        lora_alpha=tt.lora_alpha,
        lora_dropout=tt.lora_dropout,
        projector_lr_scale=tt.lora_projector_lr / tt.lora_lr if tt.lora_r else 1.0,
    )


def run_tokens_training(settings: Settings, stage: Stage = "pretrain") -> TrainResult:
    """Train LLaVA-1.5's ``stage`` from the cache's patch tokens; resumable."""
    cfg = settings.train
    start_or_join_ray(cfg.ray_address, log_to_driver=True)
    plan = make_tokens_plan(settings, stage, cfg.num_workers)
    result = fit_on_ray(cfg, train_tokens_loop, plan)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    output = run_dir / (MIXED_PROJECTOR_FILE if plan.mix else MM_PROJECTOR_FILE)
    with result.checkpoint.as_directory() as d:
        tmp = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(Path(d) / output.name, tmp)
        tmp.replace(output)
        if stage == "finetune":
            output = write_llava_hf(
                Path(plan.llm.directory),
                Path(d) / "state.pt",
                run_dir / "llava-hf",
                lora_scale=plan.lora_alpha / plan.lora_r if plan.lora_r else None,
            )
    log_file = Path(plan.log_file)
    losses = [json.loads(x)["loss"] for x in log_file.read_text().splitlines() if x]
    return TrainResult(
        phase=stage,
        output=output,
        steps=plan.total_steps,
        effective_batch=plan.batch_size * plan.accum_iter * cfg.num_workers,
        lr=plan.lr,
        final_loss=losses[-1] if losses else None,
        log_file=log_file,
        plot=plot_losses(log_file) if losses else None,
        checkpoint_dir=(Path(cfg.output_dir) / "ray" / cfg.run_name).resolve(),
    )


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth", "model.safetensors.index.json")


def write_llava_hf(
    llava_dir: Path, state_file: Path, out: Path, lora_scale: float | None = None
) -> Path:
    """A llava-hf directory: ``llava_dir``'s files and vision tower, the trained projector and
    LLM of ``state_file`` (a checkpoint's ``state.pt``), as one ``model.safetensors``; with
    ``lora_scale`` the checkpoint holds LoRA adapters, merged into ``llava_dir``'s LLM
    (``W + scale · B A``, as LLaVA's ``merge_lora_weights.py``). Written beside ``out`` and
    renamed into place, so a reader never sees half of it."""
    from safetensors.torch import save_file

    from cachebind.encode.tensorfiles import read_tensors
    from cachebind.inject.llava_load import canonical_state
    from cachebind.train.lora import merge_lora_state

    trained = torch.load(state_file, map_location="cpu", weights_only=True)["trainable"]
    names = {"projector.": "multi_modal_projector.", "llm.": "language_model."}
    published = canonical_state(read_tensors(llava_dir), str(llava_dir))
    keep = ("vision_tower.", "language_model.") if lora_scale is not None else ("vision_tower.",)
    tensors = {k: v for k, v in published.items() if k.startswith(keep)}
    adapters = {}
    for name, tensor in trained.items():
        prefix = next(p for p in names if name.startswith(p))
        renamed = names[prefix] + name[len(prefix) :]
        if renamed.endswith((".lora_A", ".lora_B")):  # <module>.lora_A for <module>.weight
            adapters[renamed] = tensor
        else:
            tensors[renamed] = tensor
    if adapters:
        if lora_scale is None:
            raise ValueError(f"{state_file} holds LoRA adapters: give their scale")
        tensors = merge_lora_state(tensors, adapters, lora_scale)
    # A tied head shares the embedding's storage: safetensors wants each tensor its own.
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {p for pattern in WEIGHT_FILES for p in llava_dir.glob(pattern)}
    for f in llava_dir.iterdir():
        if f.is_file() and f not in weights:
            shutil.copy2(f, tmp / f.name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
