"""Audio (WAV, FLAC, MP3, OGG, … anything FFmpeg decodes) -> the audio trunk's [3, 1, 128, 204].

As ImageBind's ``load_and_transform_audio_data``:
1. decode to float in [-1, 1] (PyAV; integer PCM divided by 2^(bits-1), as ``torchaudio.load``),
   every channel kept: shape [C, N]; within ``InputLimits``' channel, rate and duration budgets;
2. resample to 16 kHz with torchaudio's Hann-windowed sinc filter (``resample.py``);
3. 3 clips of 2 s at starts ``i * max(D - 2, 0) / 3`` (``clips.py``), sliced as
   ``waveform[:, int(start * 16000) : int(end * 16000)]``;
4. per clip: subtract the clip's mean (over all channels, as the reference's ``waveform.mean()``),
   Kaldi fbank of the **first channel** (``kaldi.fbank`` reads channel 0; the reference does not
   downmix), 128 mel bins -> [128, frames]; zero-pad or cut to 204 frames;
5. normalise ``(x - (-4.268)) / 9.138`` (after padding, so padded frames become 0.467).

Audio shorter than 2 s gives three identical clips of the whole input, padded with zero frames;
audio shorter than one 25 ms analysis frame has no frame at all and is refused as ``empty``
(the reference divides by zero there).
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
import torch

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.clips import clip_timepoints
from cachebind.preprocess.common import (
    DEFAULT_LIMITS,
    RawInput,
    as_stream,
    over_limit,
    read_bytes,
    resolve_limits,
)
from cachebind.preprocess.fbank import fbank, num_frames
from cachebind.preprocess.resample import resample

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
TARGET_LENGTH = 204
CLIP_DURATION = 2
CLIPS_PER_VIDEO = 3
MEAN = -4.268
STD = 9.138
FRAME_SAMPLES = 400  # 25 ms at 16 kHz: the shortest input that yields one fbank frame

MAX_DURATION_S = DEFAULT_LIMITS.max_audio_seconds
"""``input.max_audio_seconds``: longer inputs are refused as ``too_large``."""


_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class Waveform:
    """Decoded audio: ``samples`` [channels, time] float32 in [-1, 1] at ``sample_rate`` Hz."""

    samples: torch.Tensor
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


def decode_audio(
    data: RawInput,
    source: str = "<input>",
    *,
    max_bytes: int | None = None,
    max_duration_s: float | None = None,
    limits: InputLimits | None = None,
) -> Waveform:
    """Decode the first audio stream of ``data`` at its own rate and channel count.

    Budgets (``input.max_audio_*``) are checked on the stream's header before decoding and on
    the decoded samples as they arrive, since a header may lie.
    """
    limits = resolve_limits(limits, max_bytes=max_bytes, max_audio_seconds=max_duration_s)
    raw = read_bytes(data, source, limits.max_bytes)
    try:
        container = av.open(as_stream(raw), mode="r")
    except _AV_ERRORS as e:
        raise InputError(source, "undecodable", f"not a media file FFmpeg can open: {e}") from e
    with container:
        if not container.streams.audio:
            raise InputError(source, "unsupported_format", "no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise InputError(source, "unsupported_format", "no decoder for the audio codec")
        rate = stream.rate or stream.codec_context.sample_rate
        _check_header(stream, container, source, limits)
        # Packed (interleaved) float: one data plane whatever the channel count. PyAV's
        # to_ndarray on a planar frame of 8 or more channels reads past the frame's 8 inline
        # data pointers and segfaults; a packed frame never has more than one plane.
        to_float = av.AudioResampler(format="flt")
        chunks: list[np.ndarray] = []
        budget = _Budget(source, limits)
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for out in to_float.resample(frame):
                    chunks.append(budget.take(_packed_samples(out), rate))
            for out in to_float.resample(None):
                chunks.append(budget.take(_packed_samples(out), rate))
        except InputError:
            raise  # our own refusals (InputError is a ValueError) pass through
        except _AV_ERRORS as e:
            raise InputError(source, "undecodable", f"audio decoding failed: {e}") from e
    if not chunks or not rate:
        raise InputError(source, "empty", "no audio samples decoded")
    if len({c.shape[1] for c in chunks}) > 1:
        raise InputError(source, "unsupported_format", "channel count changes within the stream")
    samples = torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks, axis=0).T))
    del chunks
    if samples.shape[-1] == 0:
        raise InputError(source, "empty", "no audio samples decoded")
    if not torch.isfinite(samples).all():
        raise InputError(source, "undecodable", "non-finite samples")
    return Waveform(samples, int(rate))


def _check_header(stream, container, source: str, limits: InputLimits) -> None:
    """Refuse from the stream's declared channels, rate and duration, before decoding."""
    ctx = stream.codec_context
    channels = ctx.channels or 0
    rate = stream.rate or ctx.sample_rate or 0
    if channels > limits.max_audio_channels:
        raise over_limit(
            source,
            "unsupported_format",
            "channels",
            channels,
            "max_audio_channels",
            limits.max_audio_channels,
        )
    if rate > limits.max_audio_sample_rate:
        raise over_limit(
            source,
            "unsupported_format",
            "sample rate (Hz)",
            rate,
            "max_audio_sample_rate",
            limits.max_audio_sample_rate,
        )
    seconds = 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    _check_duration(source, seconds, rate, max(channels, 1), limits, "declared ")


def _check_duration(
    source: str, seconds: float, rate: int, channels: int, limits: InputLimits, how: str = ""
) -> None:
    if seconds > limits.max_audio_seconds:
        raise over_limit(
            source,
            "too_large",
            f"{how}seconds",
            round(seconds, 1),
            "max_audio_seconds",
            limits.max_audio_seconds,
        )
    # Values at the input's rate and after resampling to 16 kHz (upsampling multiplies them).
    values = int(seconds * max(rate, SAMPLE_RATE) * channels)
    if values > limits.max_audio_values:
        raise over_limit(
            source,
            "too_large",
            f"{how}samples x channels",
            values,
            "max_audio_values",
            limits.max_audio_values,
        )


class _Budget:
    """Counts decoded samples against the budgets as they arrive (headers may lie)."""

    def __init__(self, source: str, limits: InputLimits) -> None:
        self.source, self.limits, self.samples = source, limits, 0

    def take(self, chunk: np.ndarray, rate: int) -> np.ndarray:
        self.samples += chunk.shape[0]
        if rate:
            seconds = self.samples / rate
            _check_duration(self.source, seconds, rate, chunk.shape[1], self.limits, "decoded ")
        return chunk


def _packed_samples(frame) -> np.ndarray:
    """[samples, channels] float32 of a packed ``flt`` frame (one plane, interleaved)."""
    channels = len(frame.layout.channels)
    return frame.to_ndarray().reshape(-1, channels)


def load_audio(
    data: RawInput | Waveform,
    source: str = "<input>",
    *,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> Waveform:
    """The decode stage: ``data`` -> [C, N] float32 at 16 kHz (resampled if needed)."""
    if isinstance(data, Waveform):
        wav = data
    else:
        wav = decode_audio(data, source, max_bytes=max_bytes, limits=limits)
    samples = resample(wav.samples, wav.sample_rate, SAMPLE_RATE)
    if samples.shape[-1] < FRAME_SAMPLES:
        raise InputError(
            source, "empty", f"{samples.shape[-1]} samples at 16 kHz: shorter than one 25 ms frame"
        )
    return Waveform(samples, SAMPLE_RATE)


def melspec(clip: torch.Tensor, target_length: int = TARGET_LENGTH) -> torch.Tensor:
    """One [C, n] clip at 16 kHz -> [1, 128, target_length] log mel (not yet normalised)."""
    clip = clip - clip.mean()
    spec = fbank(clip[0], SAMPLE_RATE, NUM_MEL_BINS).T  # [128, frames]
    frames = spec.shape[1]
    if frames < target_length:
        spec = torch.nn.functional.pad(spec, (0, target_length - frames))
    else:
        spec = spec[:, :target_length]
    return spec.unsqueeze(0)


def audio_tensor(wav: Waveform) -> torch.Tensor:
    """The transform stage: 16 kHz waveform -> [3, 1, 128, 204] normalised clips."""
    if wav.sample_rate != SAMPLE_RATE:
        raise ValueError(f"audio_tensor expects {SAMPLE_RATE} Hz, got {wav.sample_rate}")
    samples = wav.samples if wav.samples.dim() == 2 else wav.samples.reshape(1, -1)
    clips = []
    for start, end in clip_timepoints(wav.duration, CLIP_DURATION, CLIPS_PER_VIDEO):
        clip = samples[:, int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        if num_frames(clip.shape[-1], FRAME_SAMPLES, SAMPLE_RATE // 100) == 0:
            raise ValueError("clip shorter than one fbank frame")  # excluded by load_audio
        clips.append((melspec(clip) - MEAN) / STD)
    return torch.stack(clips)


def preprocess_audio(
    data: RawInput | Waveform, source: str = "<input>", *, limits: InputLimits | None = None
) -> torch.Tensor:
    """``load_audio`` then ``audio_tensor``: one input -> [3, 1, 128, 204] float32."""
    return audio_tensor(load_audio(data, source, limits=limits))
