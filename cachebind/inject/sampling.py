"""The released sampling (temperature, then top-p nucleus as ``LLaMA_adapter.generate`` does
it), split so that a batch of rows with their own settings and their own seeded generators
shares every step but the draw.

Every step here computes a row from that row alone (softmax, sort and cumsum run along the
last axis; temperature and top-p are per-row tensors, so the division is the same IEEE
operation whatever the batch), and the draw (renormalise, ``multinomial``) runs on the row by
itself with its own generator: a seeded request draws exactly the tokens it draws alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def storable(value: float, dtype: torch.dtype = torch.float32) -> float:
    """``value`` within ``dtype``'s finite range: a temperature of 1e308 is stored as
    float32's largest (as good as uniform either way) rather than refused."""
    top = torch.finfo(dtype).max
    return min(max(float(value), -top), top)


def per_row(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a [B, 1] tensor beside ``like`` [B, V], of its dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, 1)
    value = storable(value, like.dtype)
    return torch.full((like.shape[0], 1), value, dtype=like.dtype, device=like.device)


def tempered_probs(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last axis, finite for any temperature > 0.

    Shifted by the row's largest logit first (softmax does not change): a tiny temperature
    (1e-300) would otherwise overflow every logit to ±inf and the softmax to NaN, and a
    request asking for it would fail the whole decode batch. In the limit it is greedy.
    ``temperature``: one for all rows, or [B] / [B, 1] per row."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    # Below float32's smallest normal the temperature itself would round to 0 (0 / 0 = NaN).
    t = per_row(temperature, logits).clamp(min=torch.finfo(logits.dtype).tiny)
    return torch.softmax(shifted / t, dim=-1)


def nucleus(probs: torch.Tensor, p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distribution with everything past the top-p prefix zeroed (the smallest
    prefix whose mass *before* a token is at most p), and the sort's token ids. [B, V] each."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > per_row(p, probs)] = 0.0
    return probs_sort, probs_idx


def draw(
    probs_sort: torch.Tensor, probs_idx: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Renormalise the nucleus and draw one token per row: [B, V] -> [B]."""
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample_top_p(
    probs: torch.Tensor, p: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Nucleus sampling as released, every row from ``generator``. [B, V] -> [B]."""
    return draw(*nucleus(probs, p), generator)


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    ignore_eos: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    eos_id: int,
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """One token per row of ``logits`` [B, V] (as a tensor and as a list), and which rows'
    logits hold NaN (their token is meaningless: the caller ends those rows alone).

    ``temperature`` / ``top_p`` [B, 1], ``ignore_eos`` [B] bool; ``generators[i]`` is row i's
    own generator, or None for a greedy row (argmax). One pass over the batch for everything
    but the sampled rows' draws, which take their own generators."""
    logits = logits.float()
    bad = torch.isnan(logits).any(dim=-1)
    if bool(ignore_eos.any()):
        logits[:, eos_id].masked_fill_(ignore_eos, -float("inf"))
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, g in enumerate(generators) if g is not None]
    if not sampled:
        return tokens, tokens.tolist(), bad.tolist()
    is_bad = bad.tolist()
    sampled = [i for i in sampled if not is_bad[i]]  # multinomial refuses NaN: leave them out
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = tempered_probs(logits[rows], temperature[rows])
        probs_sort, probs_idx = nucleus(probs, top_p[rows])
        for j, i in enumerate(sampled):
            tokens[i] = draw(probs_sort[j : j + 1], probs_idx[j : j + 1], generators[i])[0]
    return tokens, tokens.tolist(), is_bad
