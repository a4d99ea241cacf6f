"""Audio preprocessing: decode (PyAV) -> 16 kHz (torchaudio's sinc resampler) -> 3 clips of 2 s ->
Kaldi fbank (128 mel) -> 204 frames -> (x + 4.268) / 9.138, checked against torchaudio's own
``kaldi.py`` and ``resample`` (reference files run as published, see preprocess_oracle.py)."""

from __future__ import annotations

from fractions import Fraction

import fixtures_media as fm
import numpy as np
import preprocess_oracle
import pytest
import torch

from cachebind.errors import InputError
from cachebind.preprocess import preprocess
from cachebind.preprocess.audio import (
    MEAN,
    STD,
    Waveform,
    audio_tensor,
    decode_audio,
    load_audio,
)
from cachebind.preprocess.clips import clip_timepoints
from cachebind.preprocess.fbank import fbank
from cachebind.preprocess.resample import resample


def kaldi_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """torchaudio's fbank with exactly ImageBind's arguments (imagebind/data.py)."""
    return preprocess_oracle.torchaudio_kaldi().fbank(
        waveform,
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_length=25,
        frame_shift=10,
    )


def reference_audio(samples: torch.Tensor, sr: int) -> torch.Tensor:
    """ImageBind's load_and_transform_audio_data after torchaudio.load, step by step, with
    torchaudio's resample and fbank as the oracle and pytorchvideo's clip arithmetic."""
    waveform = samples.clone()
    if sr != 16000:
        waveform = preprocess_oracle.torchaudio_resample()(waveform, orig_freq=sr, new_freq=16000)
    duration = waveform.size(1) / 16000
    max_start = Fraction(max(duration - Fraction(2), 0))
    step = Fraction(max_start, 3)
    clips = []
    for i in range(3):
        start, end = step * i, step * i + Fraction(2)
        clip = waveform[:, int(start * 16000) : int(end * 16000)]
        clip = clip - clip.mean()
        spec = kaldi_fbank(clip).transpose(0, 1)
        p = 204 - spec.size(1)
        spec = torch.nn.functional.pad(spec, (0, p)) if p > 0 else spec[:, :204]
        clips.append((spec.unsqueeze(0) - -4.268) / 9.138)
    return torch.stack(clips)


@pytest.mark.parametrize(
    "signal",
    [
        fm.noise(2.0, 16000, seed=1)[0],
        fm.tone(2.0, 16000, freq=1000.0)[0],
        fm.noise(0.5, 16000, seed=2)[0] * 0.01,
        fm.tone(1.0, 16000, freq=60.0)[0] + 0.3,  # DC offset
        np.zeros(16000, np.float32),  # silence: log floor
        fm.noise(0.0251, 16000, seed=3)[0],  # one frame and a bit
    ],
    ids=["noise", "tone1k", "quiet", "dc", "silence", "one-frame"],
)
def test_fbank_matches_torchaudio_kaldi(signal):
    x = torch.from_numpy(np.ascontiguousarray(signal))
    expected = kaldi_fbank(x[None])
    ours = fbank(x)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize(
    ("orig", "new"), [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000), (16000, 44100)]
)
def test_resample_matches_torchaudio(orig, new):
    x = torch.from_numpy(fm.noise(0.7, orig, channels=2, seed=4))
    expected = preprocess_oracle.torchaudio_resample()(x, orig, new)
    ours = resample(x, orig, new)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-5


def test_clip_starts_follow_the_constant_clips_sampler():
    starts = [s for s, _ in clip_timepoints(10.0, 2, 3)]
    assert starts == [0, Fraction(8, 3), Fraction(16, 3)]
    assert all(e - s == 2 for s, e in clip_timepoints(10.0, 2, 3))
    assert clip_timepoints(1.5, 2, 3) == [(0, 2)] * 3  # short input: 3 clips at 0


def test_44k_stereo_wav_decodes_resamples_and_matches_the_reference_pipeline():
    samples = fm.tone(3.0, 44100, channels=2, freq=440.0)
    raw = fm.encode_audio(samples, 44100, "wav")
    wav = decode_audio(raw, "stereo.wav")
    assert wav.sample_rate == 44100 and wav.samples.shape == (2, 132300)
    # int16 PCM decodes to float exactly as torchaudio.load does: x / 32768
    quantised = np.round(np.clip(samples, -1, 1) * 32767) / 32768
    np.testing.assert_allclose(wav.samples.numpy(), quantised, atol=1e-7)
    at16k = load_audio(wav)
    assert at16k.sample_rate == 16000 and at16k.samples.shape == (2, 48000)
    ours = audio_tensor(at16k)
    expected = reference_audio(wav.samples, 44100)
    assert ours.shape == expected.shape == (3, 1, 128, 204)
    assert (ours - expected).abs().max().item() < 1e-3


def test_only_the_first_channel_is_analysed_like_kaldi_fbank():
    left = fm.tone(3.0, 16000, freq=300.0)[0]
    right_a, right_b = fm.noise(3.0, 16000, seed=5)[0], fm.noise(3.0, 16000, seed=6)[0]
    # Same left channel and same overall mean: the right channel must not matter.
    right_b = right_b - right_b.mean() + right_a.mean()
    a = audio_tensor(Waveform(torch.from_numpy(np.stack([left, right_a])), 16000))
    b = audio_tensor(Waveform(torch.from_numpy(np.stack([left, right_b])), 16000))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("fmt", "rate", "channels"),
    [
        ("wav", 16000, 1),
        ("wav", 8000, 1),
        ("wav", 48000, 6),
        ("flac", 44100, 2),
        ("flac", 22050, 1),
        ("mp3", 44100, 2),
        ("mp3", 16000, 1),
        ("ogg", 44100, 2),
        ("opus", 16000, 1),
    ],
)
def test_formats_rates_and_channel_counts_give_the_same_spectrum(fmt, rate, channels):
    x = preprocess("audio", fm.audio_bytes(fmt, rate, channels, duration_s=3.0))
    assert x.shape == (3, 1, 128, 204) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # A 440 Hz tone: whatever the codec, the loudest mel bin must be the one of the 16 kHz WAV.
    ref = preprocess("audio", fm.audio_bytes("wav", 16000, 1, duration_s=3.0))
    peak = x[:, 0, :, 20:180].mean(dim=(0, 2)).argmax().item()
    ref_peak = ref[:, 0, :, 20:180].mean(dim=(0, 2)).argmax().item()
    assert abs(peak - ref_peak) <= 1


def test_audio_shorter_than_2s_is_padded_like_the_reference():
    wav = Waveform(torch.from_numpy(fm.noise(1.0, 16000, seed=7)), 16000)
    x = audio_tensor(wav)
    frames = 1 + (16000 - 400) // 160  # 98
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    pad_value = torch.tensor((0.0 - MEAN) / STD)
    assert torch.allclose(x[0, 0, :, frames:], pad_value)
    assert not torch.allclose(x[0, 0, :, frames - 1], pad_value)
    torch.testing.assert_close(x, reference_audio(wav.samples, 16000), atol=1e-3, rtol=0)


def test_long_audio_is_cut_to_204_frames_per_clip():
    wav = Waveform(torch.from_numpy(fm.noise(12.0, 16000, seed=8)), 16000)
    x = audio_tensor(wav)
    torch.testing.assert_close(x, reference_audio(wav.samples, 16000), atol=1e-3, rtol=0)
    assert not torch.equal(x[0], x[1])  # clips start at 0, 10/3 and 20/3 s


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (fm.encode_audio(fm.tone(0.02, 16000), 16000, "wav"), "empty"),  # < one 25 ms frame
        (fm.garbage(), "undecodable"),
        (fm.video_bytes("webm", 1.0), "unsupported_format"),  # no audio stream
        (b"", "empty"),
    ],
    ids=["too-short", "garbage", "no-audio-stream", "zero-bytes"],
)
def test_bad_audio_is_refused(raw, reason):
    with pytest.raises(InputError) as err:
        preprocess("audio", raw, source="clip-42.wav")
    assert err.value.reason == reason and "clip-42.wav" in str(err.value)
