"""A KV cache preallocated per batch slot, for in-flight batching (``inject.scheduler``).

Every slot owns the keys and values of one request, positions 0 … max_seq_len - 1 of its own
prompt, so a request never sees left padding: its BOS is at position 0 of its slot whatever the
other rows hold, and rows join and leave without moving anyone's cache. The buffers have static
shapes [n_layers, max_batch, n_kv_heads, max_seq_len, head_dim] (fp16/bf16 on GPU, fp32 on CPU),
allocated once at start-up after ``check_kv_memory`` compared their size with the device.

The transformers attention only calls ``update(key_states, value_states, layer_idx)``; this
object answers it for the rows and positions that ``bind_decode`` / ``bind_prefill`` set for the
forward call in progress, and the attention mask passed alongside (``decode_mask`` /
``prefill_mask``, 4D bool, used by the library as is) hides every position a row has not written.
"""

from __future__ import annotations

import os

import torch

from cachebind.inject.model import AdapterLlamaConfig
from cachebind.inject.sampling import storable


class KVMemoryError(RuntimeError):
    """The KV cache for ``max_batch`` × ``max_seq_len`` does not fit on the device."""


def kv_cache_bytes(cfg: AdapterLlamaConfig, max_batch: int, max_seq_len: int, dtype) -> int:
    """Bytes of K and V for every layer, slot and position."""
    head_dim = cfg.dim // cfg.n_heads
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * max_batch * kv_heads * max_seq_len * head_dim * elt


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_kv_memory(
    cfg: AdapterLlamaConfig,
    max_batch: int,
    max_seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    headroom: float = 0.9,
    spare_slots: int = 0,
) -> int:
    """The KV cache's size in bytes (with ``spare_slots`` more slots' worth: the stored
    prompt prefix), or a ``KVMemoryError`` saying what to lower."""
    need = kv_cache_bytes(cfg, max_batch + spare_slots, max_seq_len, dtype)
    have = available_bytes(device)
    if need > headroom * have:
        raise KVMemoryError(
            f"the KV cache for llm.max_batch={max_batch} x max_seq_len={max_seq_len} needs "
            f"{need / 2**30:.2f} GiB ({cfg.n_layers} layers, {dtype}) but {device} has "
            f"{have / 2**30:.2f} GiB free; lower llm.max_batch"
        )
    return need


class SlotCache:
    """K and V per slot; ``update`` writes the call's new positions and returns the slots' past."""

    def __init__(
        self,
        cfg: AdapterLlamaConfig,
        max_batch: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        head_dim = cfg.dim // cfg.n_heads
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        shape = (cfg.n_layers, max_batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        # decode: the slots' indices; prefill: (slot, start, length) per row; none before a bind.
        self._rows: torch.Tensor | list[tuple[int, int, int]] = torch.arange(0, device=device)
        self._at: torch.Tensor | int = 0
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def slot_nbytes(self) -> int:
        """Bytes of K and V that one slot holds (every layer and position)."""
        return self.nbytes // self.max_batch

    def bind_decode(self, n_rows: int, positions: torch.Tensor, kv_len: int) -> None:
        """The next call decodes one token for slots 0 … n_rows - 1, slot i at positions[i]."""
        self._rows = torch.arange(n_rows, device=self.k.device)
        self._at = positions
        self._kv_len = kv_len

    def bind_prefill(self, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        """The next call writes, for each row i, ``lengths[i]`` prompt positions of
        ``slots[i]`` from ``starts[i]`` on, taken from the right end of the row's chunk (the
        chunks are left-padded to one width, so every row's last prompt token is last)."""
        self._rows = list(zip(slots, starts, lengths, strict=True))
        self._at = torch.tensor(slots, device=self.k.device)
        self._kv_len = max(s + n for s, n in zip(starts, lengths, strict=True))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, H, q, D] new keys/values -> the slots' keys/values [b, H, kv_len, D] (views)."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        if isinstance(self._rows, list):  # prefill: a run of positions per slot
            width = key_states.shape[2]
            for i, (slot, start, n) in enumerate(self._rows):
                k[slot, :, start : start + n] = key_states[i, :, width - n :]
                v[slot, :, start : start + n] = value_states[i, :, width - n :]
            if len(self._rows) == 1:
                slot = self._rows[0][0]
                return k[slot : slot + 1, :, : self._kv_len], v[slot : slot + 1, :, : self._kv_len]
            return k[self._at, :, : self._kv_len], v[self._at, :, : self._kv_len]
        # decode: one position per slot, each its own
        k[self._rows, :, self._at] = key_states[:, :, 0]
        v[self._rows, :, self._at] = value_states[:, :, 0]
        rows = slice(0, len(self._rows))
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]


def decode_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[b, 1, 1, kv_len] bool: slot i sees its positions 0 … positions[i]."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, :] <= positions[:, None])[:, None, None, :]


def pad_groups(lengths: list[int], waste: float) -> list[list[int]]:
    """Indices of ``lengths`` in groups that each pad to their longest with at most ``waste``
    of their cells being padding (a group of one never pads), longest first.

    A left-padded chunk computes every padding column like a real token: a 95-token prompt
    beside four 8-token ones would cost 5 x 95 columns for 127 tokens' work."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            group = groups[-1]
            width = lengths[group[0]]  # the longest of the group: its first
            if (len(group) + 1) * width * (1.0 - waste) <= real + lengths[i]:
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def prefill_inputs(
    starts: list[int], lengths: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [b, width] and mask [b, 1, width, kv_len] (bool) of left-padded chunks:
    row i's chunk fills its last ``lengths[i]`` columns, at positions starts[i] onwards, and is
    causal over its slot's past; a padding column repeats the first position (never read)."""
    width = max(lengths)
    kv_len = max(s + n for s, n in zip(starts, lengths, strict=True))
    col = torch.arange(width, device=device)
    start = torch.tensor(starts, device=device)[:, None]
    pad = width - torch.tensor(lengths, device=device)[:, None]
    positions = start + (col[None, :] - pad).clamp(min=0)  # [b, width]
    keys = torch.arange(kv_len, device=device)
    mask = keys[None, None, :] <= positions[:, :, None]  # [b, width, kv_len]
    return positions, mask[:, None]


class SlotInputs:
    """Per-slot decode inputs kept on the device between steps: each slot's last token and the
    position it goes to, whether it decodes, its adapter terms and its sampling settings.

    A row's entries are written when it joins (``join``) and cleared when it leaves
    (``leave``); a decode step reads slices [:width] and advances every decoding slot with two
    tensor operations (``advance``), whatever the batch."""

    def __init__(
        self,
        max_batch: int,
        dim: int,
        adapted_layers: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.last = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.position = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=device)
        # Each adapted layer's adapter term per slot (``AdapterLlama.adapter_terms``), zeros for
        # a text-only row: computed once when the row joins, read by every step after.
        self.terms = torch.zeros(adapted_layers, max_batch, 1, dim, dtype=dtype, device=device)
        self.temperature = torch.zeros(max_batch, 1, device=device)
        self.top_p = torch.ones(max_batch, 1, device=device)
        self.ignore_eos = torch.zeros(max_batch, dtype=torch.bool, device=device)

    def join(
        self,
        slot: int,
        terms: torch.Tensor | None,
        temperature: float,
        top_p: float,
        ignore_eos: bool,
    ) -> None:
        """A row takes ``slot`` (its prompt is yet to be prefilled: it does not decode);
        ``terms`` [adapted_layers, 1, 1, dim] are its adapter terms (None: text only)."""
        self.active[slot] = False
        if terms is None:
            self.terms[:, slot].zero_()
        else:
            self.terms[:, slot] = terms[:, 0]
        self.temperature[slot] = storable(temperature)
        self.top_p[slot] = top_p
        self.ignore_eos[slot] = ignore_eos

    def start(self, slot: int, token: int, position: int) -> None:
        """The row's prompt is in the cache and its first token sampled: it decodes from now."""
        self.last[slot] = token
        self.position[slot] = position
        self.active[slot] = True

    def leave(self, slot: int) -> None:
        self.active[slot] = False

    def decode_inputs(
        self, width: int, idle_at: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [width, 1], the positions they are written at [width] (an idle slot writes
        at ``idle_at``, which no prompt reaches and its owner overwrites before reading), and
        the last position each slot sees [width] (an idle slot sees position 0 only)."""
        active, position = self.active[:width], self.position[:width]
        write_at = torch.where(active, position, idle_at)
        see = torch.where(active, position, 0)
        return self.last[:width, None], write_at, see

    def advance(self, width: int, tokens: torch.Tensor) -> None:
        """Every decoding slot of [:width] takes its sampled token, one position further."""
        active = self.active[:width]
        self.last[:width] = torch.where(active, tokens, self.last[:width])
        self.position[:width] += active
