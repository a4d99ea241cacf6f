"""Cache rows -> training examples: (F~_M, tokens, labels), as the release's ``data/dataset.py``.

Stage 1 (``PretrainDataset``): the prompt is the Alpaca template of "Generate caption of this
image", the target the caption. ``tokens`` = BOS prompt caption EOS, cut or padded to
``max_words``; ``labels`` = the same with the prompt (and padding) set to 0, the loss's
``ignore_index``. Padding is token 0 too: the mask is causal and padding only follows the text.

The order of rows is a seeded permutation per epoch (the release's ``DistributedSampler``
shuffle), so that any run — one worker or many, interrupted or not — consumes the same rows in
the same optimiser steps: optimiser step ``s`` of an epoch takes positions ``[s·G, (s+1)·G)`` of
the permutation (G = global batch), and worker ``r``'s micro-batch ``a`` within it is slice
``a·world + r``. One worker accumulating two micro-batches therefore computes exactly what two
DDP workers compute. Rows are read from the table's Lance dataset at its pinned version through
Ray Data (streamed, in order, prefetched).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cachebind.inject.prompts import format_prompt
from cachebind.inject.tokenizer import Tokenizer

PRETRAIN_INSTRUCTION = "Generate caption of this image"
"""The release's stage-1 instruction (``PretrainDataset.__getitem__``)."""
IGNORE = 0  # CrossEntropyLoss(ignore_index=0): prompt and padding positions carry label 0


@dataclass
class Batch:
    """One micro-batch: ``f_m`` [B, d] float32 unit vectors, ``tokens`` / ``labels`` [B, S]."""

    f_m: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.f_m.to(device), self.tokens.to(device), self.labels.to(device))


def encode_example(
    tok: Tokenizer, prompt: str, answer: str, max_words: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [max_words] int64 of one prompt + answer, masked as the release."""
    input1 = tok.encode(prompt, bos=True, eos=False)
    input2 = tok.encode(prompt + answer, bos=True, eos=True)[:max_words]
    tokens = torch.zeros(max_words, dtype=torch.int64)
    tokens[: len(input2)] = torch.tensor(input2, dtype=torch.int64)
    labels = tokens.clone()
    labels[: len(input1)] = IGNORE
    return tokens, labels


def caption_example(tok: Tokenizer, caption: str, max_words: int) -> tuple[torch.Tensor, ...]:
    """Stage 1's example for one caption."""
    return encode_example(tok, format_prompt(PRETRAIN_INSTRUCTION), str(caption), max_words)


def collate_captions(
    tok: Tokenizer, vectors: np.ndarray, captions: Sequence[str], max_words: int
) -> Batch:
    """A stage-1 micro-batch from cache rows. F_M is re-normalised in fp32 (the release feeds
    ``F.normalize(ImageBind(x))``; the table may hold it in fp16)."""
    pairs = [caption_example(tok, c, max_words) for c in captions]
    f_m = F.normalize(torch.tensor(np.asarray(vectors, dtype=np.float32)), dim=-1)
    return Batch(f_m, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of row offsets for ``epoch`` (the same on every worker)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    """Optimiser steps per epoch; the last partial global batch is dropped (``drop_last``)."""
    return n_rows // global_batch


def worker_offsets(
    order: np.ndarray,
    *,
    rank: int,
    world: int,
    micro_batch: int,
    accum: int,
    first_step: int = 0,
) -> np.ndarray:
    """Row offsets worker ``rank`` reads, micro-batch after micro-batch, from optimiser step
    ``first_step`` of the epoch to its end: [steps · accum · micro_batch]."""
    global_batch = micro_batch * accum * world
    steps = steps_per_epoch(len(order), global_batch)
    grid = order[: steps * global_batch].reshape(steps, accum, world, micro_batch)
    return grid[first_step:, :, rank, :].reshape(-1)


_DATASETS: dict[tuple[str, int], Any] = {}


def _lance_dataset(uri: str, version: int, storage_options: dict[str, str] | None) -> Any:
    """One open Lance dataset per process and (uri, version): opening costs a manifest read."""
    key = (uri, version)
    if key not in _DATASETS:
        import lance

        _DATASETS[key] = lance.dataset(uri, version=version, storage_options=storage_options)
    return _DATASETS[key]


@dataclass(frozen=True)
class RowSource:
    """Where a worker reads rows: the table's Lance dataset at a pinned version."""

    uri: str
    version: int
    storage_options: dict[str, str] | None = None
    columns: tuple[str, ...] = ("vector", "caption")

    def take(self, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``offsets``, in that order, as numpy columns."""
        from cachebind.store.table import vectors_to_numpy

        table = _lance_dataset(self.uri, self.version, self.storage_options).take(
            np.asarray(offsets, dtype=np.int64).tolist(), columns=list(self.columns)
        )
        out: dict[str, np.ndarray] = {}
        for name in self.columns:
            column = table.column(name)
            if name == "vector":
                out[name] = vectors_to_numpy(column)
            else:
                out[name] = np.asarray(column.to_pylist(), dtype=object)
        return out


def stream_rows(
    source: RowSource, offsets: np.ndarray, micro_batch: int, data_cpus: float = 0.25
) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of rows at ``offsets``, in order, through Ray Data: the offsets become a
    dataset whose ``map_batches`` reads the rows from Lance ahead of the training loop."""
    import ray.data

    if len(offsets) == 0:
        return iter(())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the schedule: keep it
    ctx.enable_progress_bars = False  # one bar per epoch per worker would drown the trainer's
    ds = ray.data.from_numpy(np.asarray(offsets, dtype=np.int64)).map_batches(
        lambda batch: source.take(batch["data"]),
        batch_size=micro_batch,
        batch_format="numpy",
        num_cpus=data_cpus,
    )
    return ds.iter_batches(batch_size=micro_batch, batch_format="numpy", prefetch_batches=2)
