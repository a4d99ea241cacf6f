"""Band-limited resampling, the same filter as ``torchaudio.functional.resample`` (its defaults).

ImageBind resamples audio with ``torchaudio.functional.resample(waveform, sr, 16000)``; torchaudio
cannot be installed beside this torch, so the filter is written out here. With ``g = gcd(orig,
new)``, ``o = orig / g`` and ``n = new / g``, output sample ``J`` is a dot product of the input
``x[i]`` with a Hann-windowed sinc,

    h(t) = (f_c / o) * sinc(pi * t) * cos(pi * t / (2 * w))**2,
    t = (i / o - J / n) * f_c  clamped to +-w,   f_c = min(o, n) * rolloff,

with ``w = lowpass_filter_width`` zero crossings, the input zero outside its length, and the
output cut to ``ceil(n * len / o)``.

torchaudio builds a bank of ``n`` kernels of ``2 * width + o`` taps each and runs them as one
strided ``conv1d``. That bank is ``n * o`` floats: tiny for 44.1 or 48 kHz, but 8,001 Hz -> 16 kHz
makes it 16000 x 8015 (513 MB) and each output then costs 8,015 multiplications for ~13 useful
taps. So the bank is used (and cached) only while it is small (``MAX_BANK_BYTES``); otherwise
``_resample_direct`` computes each output's ~``2 * w * max(1, o / n)`` taps on the fly, in
chunks of outputs: cost and memory grow with the signal, never with how odd the rates are.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99

MAX_BANK_BYTES = 1 << 20
"""Kernel banks up to this size run as torchaudio's strided conv1d, and are cached (at most
``_BANK_CACHE`` of them: 16 MiB); rates whose bank would be larger take the direct path."""
_BANK_CACHE = 16
_CHUNK_ELEMENTS = 1 << 22
"""Gathered input values per step of the direct path (x channels x outputs x taps): 16 MB."""


def _ratio(orig_freq: int, new_freq: int) -> tuple[int, int, float, int]:
    """(o, n, cutoff f_c, half-width in input samples) of torchaudio's filter."""
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    cutoff = min(o, n) * ROLLOFF
    return o, n, cutoff, math.ceil(LOWPASS_FILTER_WIDTH * o / cutoff)


def bank_bytes(orig_freq: int, new_freq: int) -> int:
    """Bytes of torchaudio's kernel bank for this pair of rates (float32)."""
    o, n, _, width = _ratio(orig_freq, new_freq)
    return 4 * n * (2 * width + o)


@lru_cache(maxsize=_BANK_CACHE)
def sinc_kernel(orig_freq: int, new_freq: int) -> tuple[torch.Tensor, int]:
    """The [n, 1, 2*width + o] float32 kernel bank and its half-width ``width`` (input samples).

    Only called for banks of at most ``MAX_BANK_BYTES`` (the cache's bound is in bytes)."""
    o, n, cutoff, width = _ratio(orig_freq, new_freq)
    lpw = LOWPASS_FILTER_WIDTH
    # Positions of the input taps (in output-block units) relative to each output phase j.
    # float32 throughout, as torchaudio does for a float32 waveform (same rounding, same kernel).
    taps = torch.arange(-width, width + o, dtype=torch.float32)[None, None] / o
    phases = torch.arange(0, -n, -1, dtype=torch.float32)[:, None, None] / n
    t = ((phases + taps) * cutoff).clamp_(-lpw, lpw)
    window = torch.cos(t * math.pi / lpw / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * (window * (cutoff / o))
    return kernel, width


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """[..., time] float waveform at ``orig_freq`` Hz -> the same at ``new_freq`` Hz."""
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError("sample rates must be positive")
    if orig_freq == new_freq:
        return waveform
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1])
    if bank_bytes(orig_freq, new_freq) <= MAX_BANK_BYTES:
        y = _resample_bank(x, orig_freq, new_freq)
    else:
        y = _resample_direct(x, orig_freq, new_freq)
    return y.reshape(*shape[:-1], -1)


def _resample_bank(x: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio's own method: the kernel bank as one strided conv1d over [rows, time]."""
    o, n, _, _ = _ratio(orig_freq, new_freq)
    kernel, width = sinc_kernel(orig_freq, new_freq)
    length = x.shape[-1]
    x = torch.nn.functional.pad(x, (width, width + o))
    y = torch.nn.functional.conv1d(x[:, None], kernel.to(x.dtype), stride=o)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    return y[:, : math.ceil(n * length / o)]


def _resample_direct(x: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """The bank's filter evaluated per output sample ``J = b n + j``, over the taps ``i = b o + k``
    with ``|i - J o / n| <= width`` (the bank's other taps are clamped to a zero of the window).

    The position ``t = (-j / n + k / o) * f_c`` is rounded exactly as torchaudio's float32 bank
    rounds it (that rounding is amplified by ``f_c``, which is large for odd rates), so the
    output matches torchaudio's, not merely the ideal filter.
    """
    o, n, cutoff, width = _ratio(orig_freq, new_freq)
    rows, length = x.shape
    total = math.ceil(n * length / o)
    offsets = torch.arange(-width, width + 2, dtype=torch.int64)
    # The weights depend on the phase j only: one [n, taps] table (at most 16000 x ~300
    # floats for rates up to 384 kHz) when the signal has more outputs than phases.
    table = _phase_weights(torch.arange(n), o, n, cutoff, offsets) if n <= total else None
    padded = torch.nn.functional.pad(x, (width + 1, width + 2))  # every tap index in range
    out = torch.empty(rows, total, dtype=x.dtype)
    step = max(1, _CHUNK_ELEMENTS // (len(offsets) * max(rows, 1)))
    for start in range(0, total, step):
        big_j = torch.arange(start, min(start + step, total), dtype=torch.int64)
        block, j = big_j // n, big_j % n
        weights = table[j] if table is not None else _phase_weights(j, o, n, cutoff, offsets)
        first = block * o + (j * o) // n + (width + 1)  # tap k = 0 of each output, in padded
        index = first[:, None] + offsets[None]
        gathered = padded[:, index.reshape(-1)].reshape(rows, *index.shape)
        out[:, start : start + len(big_j)] = torch.einsum(
            "rot,ot->ro", gathered, weights.to(x.dtype)
        )
    return out


def _phase_weights(
    j: torch.Tensor, o: int, n: int, cutoff: float, offsets: torch.Tensor
) -> torch.Tensor:
    """[len(j), taps] float32 kernel values of phases ``j`` at taps ``floor(j o / n) + offsets``,
    computed with torchaudio's float32 operations in its order."""
    lpw = LOWPASS_FILTER_WIDTH
    k = ((j * o) // n)[:, None] + offsets[None]
    t = (-j).to(torch.float32)[:, None] / n + k.to(torch.float32) / o
    t = (t * cutoff).clamp_(-lpw, lpw)
    window = torch.cos(t * math.pi / lpw / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return sinc * (window * (cutoff / o))
