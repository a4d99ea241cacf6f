"""Band-limited resampling, the same filter as ``torchaudio.functional.resample`` (its defaults).

ImageBind resamples audio with ``torchaudio.functional.resample(waveform, sr, 16000)``; torchaudio
cannot be installed beside this torch, so the filter is written out here. With ``g = gcd(orig,
new)``, ``o = orig / g`` and ``n = new / g``, output sample ``j`` of each block of ``n`` is a dot
product of the input with a Hann-windowed sinc,

    h_j(t) = (f_c / o) * sinc(pi * f_c * t) * cos(pi * t * f_c / (2 * w))**2,
    t = i / o - j / n  clamped to +-w / f_c,   f_c = min(o, n) * rolloff,

with ``w = lowpass_filter_width`` zero crossings. The input is zero-padded, the ``n`` kernels
run as one strided ``conv1d`` (stride ``o``), and the output is cut to ``ceil(n * len / o)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def sinc_kernel(
    orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> tuple[torch.Tensor, int]:
    """The [n, 1, 2*width + o] float32 kernel bank and its half-width ``width`` (input samples)."""
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    cutoff = min(o, n) * rolloff
    width = math.ceil(lowpass_filter_width * o / cutoff)
    # Positions of the input taps (in output-block units) relative to each output phase j.
    # float32 throughout, as torchaudio does for a float32 waveform (same rounding, same kernel).
    taps = torch.arange(-width, width + o, dtype=torch.float32)[None, None] / o
    phases = torch.arange(0, -n, -1, dtype=torch.float32)[:, None, None] / n
    t = ((phases + taps) * cutoff).clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
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
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    kernel, width = sinc_kernel(orig_freq, new_freq)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1])
    length = x.shape[-1]
    x = torch.nn.functional.pad(x, (width, width + o))
    y = torch.nn.functional.conv1d(x[:, None], kernel.to(x.dtype), stride=o)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(n * length / o)
    return y[:, :target].reshape(*shape[:-1], -1)
