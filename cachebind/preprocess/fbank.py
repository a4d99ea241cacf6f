"""Kaldi-compatible log mel filterbank, the subset of ``torchaudio.compliance.kaldi.fbank`` that
ImageBind's audio transform uses (torchaudio cannot be installed beside this torch).

ImageBind calls ``fbank(x, htk_compat=True, sample_frequency=16000, use_energy=False,
window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)`` and keeps
Kaldi's other defaults. Per frame of 400 samples (25 ms), hop 160 (10 ms), ``snip_edges`` (only
whole frames: ``1 + (N - 400) // 160`` of them):

1. remove the frame's DC offset (subtract its mean);
2. pre-emphasis 0.97: ``x[i] -= 0.97 * x[i-1]`` (``x[-1]`` := ``x[0]``);
3. multiply by a symmetric Hann window (``hann_window(400, periodic=False)``);
4. zero-pad to 512 (next power of two) and take the power spectrum ``|rfft|^2`` (257 bins);
5. apply 128 triangular filters equally spaced on the mel scale ``1127 ln(1 + f / 700)``
   between 20 Hz and Nyquist (the last, Nyquist, bin gets no weight);
6. natural log, floored at float32 machine epsilon.

``htk_compat`` only moves the energy coefficient, which ``use_energy=False`` drops.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import overload

import torch

PREEMPHASIS = 0.97
LOW_FREQ = 20.0
_EPS = torch.finfo(torch.float32).eps


@overload
def mel_scale(freq: torch.Tensor) -> torch.Tensor: ...
@overload
def mel_scale(freq: float) -> float: ...
def mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's (HTK) mel scale."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def mel_banks(num_bins: int, padded_window: int, sample_freq: float) -> torch.Tensor:
    """[num_bins, padded_window // 2 + 1] triangular mel filters (float32)."""
    num_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_freq
    fft_bin_width = sample_freq / padded_window
    mel_low, mel_high = mel_scale(LOW_FREQ), mel_scale(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = mel_scale(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    # Kaldi's filters cover bins 0..N/2-1; the Nyquist bin gets a zero column.
    return torch.nn.functional.pad(banks, (0, 1)).to(torch.float32)


def num_frames(num_samples: int, frame_length: int, frame_shift: int) -> int:
    """Whole frames that fit (Kaldi ``snip_edges=True``)."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def fbank(
    waveform: torch.Tensor,
    sample_frequency: float = 16000.0,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """[num_frames, num_mel_bins] log mel energies of a 1-D (or [1, N]) float waveform.

    Hanning window, no dither, no energy term, power spectrum, as ImageBind configures Kaldi.
    """
    x = waveform.reshape(-1) if waveform.dim() == 1 else waveform[0]
    frame_length = int(sample_frequency * frame_length_ms * 0.001)
    frame_shift = int(sample_frequency * frame_shift_ms * 0.001)
    padded = 1 << (frame_length - 1).bit_length()
    m = num_frames(x.numel(), frame_length, frame_shift)
    if m == 0:
        return x.new_zeros((0, num_mel_bins))
    frames = x.as_strided((m, frame_length), (frame_shift * x.stride(0), x.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - PREEMPHASIS * previous[:, :-1]
    window = torch.hann_window(frame_length, periodic=False, dtype=x.dtype)
    frames = torch.nn.functional.pad(frames * window, (0, padded - frame_length))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    energies = power @ mel_banks(num_mel_bins, padded, float(sample_frequency)).to(x.dtype).T
    return torch.clamp(energies, min=_EPS).log()
