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
Ray Data (streamed, in order, prefetched). On a table with augmented views (``embed
--views N``) each row's F_M for the epoch is drawn from {centre, view 1..N} (``view_choices``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

    def args(self) -> tuple[torch.Tensor, ...]:
        """``LossModule.forward``'s arguments."""
        return self.f_m, self.tokens, self.labels

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
    tok: Tokenizer, vectors: np.ndarray, captions: Iterable[str], max_words: int
) -> Batch:
    """A stage-1 micro-batch from cache rows. F_M is re-normalised in fp32 (the release feeds
    ``F.normalize(ImageBind(x))``; the table may hold it in fp16)."""
    pairs = [caption_example(tok, c, max_words) for c in captions]
    f_m = F.normalize(torch.tensor(np.asarray(vectors, dtype=np.float32)), dim=-1)
    return Batch(f_m, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def collate_instructions(
    tok: Tokenizer,
    vectors: np.ndarray,
    prompts: Iterable[str],
    answers: Iterable[str],
    max_words: int,
) -> Batch:
    """A stage-2 micro-batch (prompts already in the Alpaca template, ``instruct``)."""
    pairs = [encode_example(tok, p, a, max_words) for p, a in zip(prompts, answers, strict=True)]
    f_m = F.normalize(torch.tensor(np.asarray(vectors, dtype=np.float32)), dim=-1)
    return Batch(f_m, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def collate_rows(tok: Tokenizer, rows: dict[str, np.ndarray], max_words: int) -> Batch:
    """Stage 1 rows (``caption``) or stage 2 examples (``prompt`` + ``answer``)."""
    if "prompt" in rows:
        return collate_instructions(tok, rows["vector"], rows["prompt"], rows["answer"], max_words)
    return collate_captions(tok, rows["vector"], rows["caption"], max_words)


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of row offsets for ``epoch`` (the same on every worker)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


VIEW_STREAM = 16
"""Keeps the view draws' generator apart from the order's (``epoch_order``) for one seed."""


def view_choices(n_rows: int, seed: int, epoch: int, views: int) -> np.ndarray:
    """Which F_M each row offset trains on in ``epoch`` on a table with ``views`` augmented
    views (``embed --views``): 0 is the centre ``vector``, k the k-th of ``view_vectors``,
    uniform over the N + 1, as the release draws a fresh random crop per epoch. A function of
    (seed, epoch, offset) only, so every worker count and a resumed run draw the same."""
    rng = np.random.default_rng([seed, epoch, VIEW_STREAM])
    return rng.integers(0, views + 1, size=n_rows, dtype=np.int64)


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
