"""Reuse of a text-only prompt's leading KV entries by the next text-only prompts that start
with the same tokens (the Alpaca template's head, which every templated prompt shares).

Keys and values at a position depend only on the tokens up to it, so a later prompt that shares
its first m tokens with a prefilled one can take those m positions' K and V by a copy into its
slot at admission, and prefill only the rest. A visual row cannot: the adapter term enters every
adapted layer's output at every position, so its K and V depend on its own T_I; neither gives
nor takes. Like any chunked prefill, the copied entries came from a forward of another shape,
which on a CPU may round the last bits of a value differently; tokens stay those of a lone run
(the scheduler's tests compare them).
"""

from __future__ import annotations

import torch

from cachebind.inject.slots import SlotCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """One stored prompt's K and V (a slot's worth of memory, allocated at start-up)."""

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.k = torch.zeros_like(cache.k[:, 0])  # [layers, heads, max_seq_len, head_dim]
        self.v = torch.zeros_like(cache.v[:, 0])
        self.ids: list[int] = []
        self.reused_tokens = 0  # prompt positions taken from here instead of prefilled

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reuse(self, slot: int, ids: list[int]) -> int:
        """Copy the stored entries ``ids`` shares into ``slot``; how many positions that is
        (never the prompt's last: its logits are what the prefill is for)."""
        m = min(common_prefix(self.ids, ids), len(ids) - 1)
        if m > 0:
            self.cache.k[:, slot, :, :m] = self.k[:, :, :m]
            self.cache.v[:, slot, :, :m] = self.v[:, :, :m]
            self.reused_tokens += m
        return m

    def would_store(self, ids: list[int]) -> bool:
        """Whether ``offer`` keeps ``ids``: the stored prompt is of little use to prompts like
        it (shares less than half of the shorter), or nothing is stored."""
        return not self.ids or common_prefix(self.ids, ids) < min(len(self.ids), len(ids)) // 2

    def offer(self, slot: int, ids: list[int]) -> None:
        """A text-only prompt was just prefilled into ``slot``: keep it if ``would_store``."""
        if not self.would_store(ids):
            return
        n = len(ids)
        self.k[:, :, :n] = self.cache.k[:, slot, :, :n]
        self.v[:, :, :n] = self.cache.v[:, slot, :, :n]
        self.ids = list(ids)
