"""Hostile input at the preprocessing entry points: every budget of ``InputLimits`` refuses its
bomb with an ``InputError`` naming the limit, before the work it would cost; crafted files that
crashed native code return an error or a correct tensor; and the worst cases' peak memory,
measured in fresh processes, stays under stated bounds.

Inputs come from ``hostile_media`` (generated here, small). Anything that once crashed a
decoder runs in a subprocess, never in this process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hostile_media as hm
import numpy as np
import preprocess_oracle
import pytest
import torch
from PIL import Image

from cachebind.config import InputLimits, load_config
from cachebind.errors import InputError
from cachebind.preprocess import preprocess
from cachebind.preprocess import resample as rs
from cachebind.preprocess.common import center_crop_box, resize_center_crop, resize_size

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "hostile.bin"


def refused(modality: str, data, reason: str, limits: InputLimits | None = None) -> InputError:
    with pytest.raises(InputError) as err:
        preprocess(modality, data, source=SOURCE, limits=limits)
    assert err.value.reason == reason, err.value
    assert err.value.source == SOURCE
    return err.value


def run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with this checkout first on the path (a native crash there
    shows as a negative return code, not a dead test run)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


# --------------------------------------------------------------------------- native crashes


def test_many_channel_audio_never_crashes_the_process_and_decodes_every_channel():
    """8+ channel audio segfaulted in PyAV's planar ``to_ndarray``: each file must now give a
    correct tensor or an InputError, in a process that exits normally."""
    result = run_isolated(
        """
        import io, wave, json
        import numpy as np
        import hostile_media as hm
        from cachebind.errors import InputError
        from cachebind.preprocess import preprocess
        from cachebind.preprocess.audio import decode_audio

        cases = {f"wav{c}x{n}": hm.wav(c, n) for c in (8, 9, 16) for n in (64, 500)}
        cases["flac8"] = hm.encoded_audio("flac", "flac", 8)
        cases["opus8"] = hm.encoded_audio("libopus", "ogg", 8)
        out = {}
        for name, raw in cases.items():
            try:
                x = preprocess("audio", raw, source=name)
                out[name] = ["tensor", list(x.shape), bool(x.isfinite().all())]
            except InputError as e:
                out[name] = ["error", e.reason]
        # Every channel kept, in order, with torchaudio.load's scaling.
        raw = hm.wav(9, 500, seed=3)
        with wave.open(io.BytesIO(raw)) as w:
            pcm = np.frombuffer(w.readframes(500), "<i2").reshape(500, 9).T / 32768.0
        wav = decode_audio(raw)
        out["channels"] = [list(wav.samples.shape), float(np.abs(wav.samples.numpy() - pcm).max())]
        print(json.dumps(out))
        """
    )
    assert result.returncode == 0, f"decoder died ({result.returncode}): {result.stderr[-2000:]}"
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["wav8x64"] == ["error", "empty"]  # the 1,068-byte file: 4 ms of audio
    assert len(hm.wav(8, 64)) == 1068
    for name in ("wav8x500", "wav9x500", "wav16x500", "flac8", "opus8"):
        assert out[name] == ["tensor", [3, 1, 128, 204], True], name
    shape, err = out["channels"]
    assert shape == [9, 500] and err < 1e-7


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(("orig", "new"), [(11025, 16000), (997, 16000), (16000, 11025)])
def test_odd_rates_resample_like_torchaudio_without_its_kernel_bank(orig, new):
    assert rs.bank_bytes(orig, new) > rs.MAX_BANK_BYTES  # these take the direct path
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, orig // 2)).astype("f4"))
    expected = preprocess_oracle.torchaudio_resample()(x, orig, new)
    ours = rs.resample(x, orig, new)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-5  # the tolerance of the existing tests


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (8000, 16000), (16000, 44100)])
def test_direct_path_matches_torchaudio_on_common_rates_too(orig, new, monkeypatch):
    monkeypatch.setattr(rs, "MAX_BANK_BYTES", 0)
    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (1, orig // 3)).astype("f4"))
    expected = preprocess_oracle.torchaudio_resample()(x, orig, new)
    assert (rs.resample(x, orig, new) - expected).abs().max().item() < 1e-5


def test_odd_rates_add_nothing_to_the_kernel_cache():
    """Only banks up to MAX_BANK_BYTES are ever built and cached: 16 MiB at most in all."""
    primes = [r for r in range(8001, 8200, 2) if all(r % d for d in range(3, 91, 2))][:20]
    before = rs.sinc_kernel.cache_info().currsize
    for rate in primes:  # coprime with 16000: a 16000 x ~rate bank each, in torchaudio
        preprocess("audio", hm.wav(1, 500, rate), source=SOURCE)
    assert rs.sinc_kernel.cache_info().currsize == before
    assert rs.sinc_kernel.cache_info().maxsize * rs.MAX_BANK_BYTES <= 16 * 2**20


# --------------------------------------------------------------------------- audio budgets


def test_a_flac_declaring_240s_of_6_channels_at_192k_is_refused_from_its_header():
    err = refused("audio", hm.flac_declaring(240, 6, 192000), "too_large")
    assert "input.max_audio_values" in err.detail and "declared" in err.detail


def test_long_audio_is_refused_by_its_declared_duration():
    limits = InputLimits(max_audio_seconds=5)
    err = refused("audio", hm.flac_declaring(10, 1, 16000), "too_large", limits)
    assert "input.max_audio_seconds = 5" in err.detail


def test_a_header_that_understates_the_duration_is_caught_while_decoding():
    raw = hm.flac_declaring(0.001, 1, 16000)  # holds 50 ms, declares 1 ms
    err = refused("audio", raw, "too_large", InputLimits(max_audio_seconds=0.01))
    assert "decoded" in err.detail and "input.max_audio_seconds" in err.detail


def test_channel_and_sample_rate_bombs_are_unsupported():
    err = refused("audio", hm.wav(40, 100), "unsupported_format")
    assert "input.max_audio_channels = 32" in err.detail
    err = refused("audio", hm.wav(1, 100, 400_000), "unsupported_format")
    assert "input.max_audio_sample_rate" in err.detail


def test_upsampling_counts_against_the_sample_budget():
    # 1 s at 100 Hz is 100 samples, but 16,000 once resampled.
    refused("audio", hm.wav(4, 100, 100), "too_large", InputLimits(max_audio_values=50_000))


# --------------------------------------------------------------------------- images


def test_a_9000_square_rgba_png_is_a_bomb_quoting_the_configured_limit():
    raw = hm.png(9000, 9000)
    assert len(raw) < 400_000
    err = refused("image", raw, "decompression_bomb")
    assert "81,000,000 px > input.max_image_pixels = 50,000,000" in err.detail


def test_beyond_pillows_own_hard_limit_the_message_still_quotes_ours():
    err = refused("image", hm.png(20000, 20000, 0), "decompression_bomb")
    assert "input.max_image_pixels" in err.detail
    assert "89478485" not in err.detail and "178956970" not in err.detail


@pytest.mark.parametrize("modality", ["image", "thermal"])
def test_a_30000_by_2_png_is_refused_by_aspect_ratio(modality):
    err = refused(modality, hm.png(30000, 2, 0), "too_large")
    assert "input.max_image_aspect_ratio = 50.0" in err.detail


def test_depth_arrays_are_bounded_like_images():
    refused("depth", np.ones((2, 30000), np.float32), "too_large")
    refused(
        "depth",
        np.ones((100, 100), np.float32),
        "decompression_bomb",
        InputLimits(max_image_pixels=9999),
    )


def test_with_the_ratio_allowed_a_thin_image_resizes_only_its_centre():
    limits = InputLimits(max_image_aspect_ratio=20000)
    x = preprocess("image", hm.png(30000, 2, 2, fill=200), source=SOURCE, limits=limits)
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    assert x.std(dim=(1, 2)).max() < 1e-6  # a flat image stays flat in every channel


@pytest.mark.parametrize("mode", ["RGB", "L", "F"])
@pytest.mark.parametrize("size", [(2400, 60), (60, 2400), (4001, 13)])
def test_crop_before_resize_equals_the_full_resize_crop(mode, size):
    """Above aspect 16 only the centre is resampled; it equals the full resize's centre crop
    (within two 8-bit levels on a few pixels, where the long side's fractional box rounds
    differently and an upscaling second pass amplifies it)."""
    w, h = size
    rng = np.random.default_rng(w + h)
    if mode == "F":
        img = Image.fromarray(rng.uniform(0, 1, (h, w)).astype(np.float32), "F")
    else:
        arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        img = Image.fromarray(arr, mode)
    new = resize_size(w, h)
    full = img.resize(new, Image.Resampling.BICUBIC).crop(center_crop_box(*new))
    ours = resize_center_crop(img)
    diff = np.abs(np.asarray(full, np.float64) - np.asarray(ours, np.float64))
    assert ours.size == (224, 224)
    if mode == "F":
        assert diff.max() < 1e-3
    else:
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02


# --------------------------------------------------------------------------- video


def test_a_4096_square_h264_clip_is_refused_from_its_header():
    raw = hm.h264(4096, 4096)
    err = refused("video", raw, "too_large")
    assert "input.max_video_frame_pixels = 8,294,400" in err.detail


def test_video_frame_and_pixel_budgets():
    raw = hm.h264(64, 48, frames=30)
    err = refused("video", raw, "too_large", InputLimits(max_video_frames=10))
    assert "input.max_video_frames = 10" in err.detail
    err = refused("video", raw, "too_large", InputLimits(max_video_pixels=64 * 48 * 20))
    assert "input.max_video_pixels" in err.detail
    assert preprocess("video", raw, source=SOURCE).shape == (15, 3, 2, 224, 224)


# --------------------------------------------------------------------------- containers

SMALL_ZIP = InputLimits(max_decompressed_bytes=8 * 2**20)


@pytest.mark.parametrize("build", [hm.torch_points_bomb, hm.npz_points_bomb], ids=["pt", "npz"])
def test_deflate_bombs_are_refused_by_the_zip_directory(build):
    raw = build(1_000_000)  # 12 MB of float32 zeros, deflated
    assert len(raw) < 200_000
    err = refused("point", raw, "decompression_bomb", SMALL_ZIP)
    assert "directory declares" in err.detail and "input.max_decompressed_bytes" in err.detail


@pytest.mark.parametrize("build", [hm.torch_points_bomb, hm.npz_points_bomb], ids=["pt", "npz"])
def test_a_zip_directory_that_understates_sizes_is_caught_while_inflating(build):
    refused("point", build(1_000_000, lie_sizes=True), "undecodable", SMALL_ZIP)


def test_a_zip_directory_pointing_past_2_to_the_63_is_undecodable():
    err = refused("point", hm.zip_with_member_at(2**63 + 5), "undecodable")
    assert "zip" in err.detail


def test_honest_small_pt_and_npz_clouds_decode():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(500, 3)).astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, points=cloud)
    from_npz = preprocess("point", buf.getvalue(), source=SOURCE)
    buf = io.BytesIO()
    torch.save(torch.from_numpy(cloud), buf)
    from_pt = preprocess("point", buf.getvalue(), source=SOURCE)
    torch.testing.assert_close(from_npz, from_pt, rtol=0, atol=0)
    torch.testing.assert_close(from_npz, preprocess("point", cloud), rtol=0, atol=0)


def test_a_strided_tensor_claiming_3e9_values_is_too_large():
    err = refused("point", hm.strided_tensor_pt(10**9), "too_large")
    assert "input.max_array_values" in err.detail


@pytest.mark.parametrize("modality", ["point", "imu"])
def test_an_npy_header_declaring_a_tebibyte_is_too_large(modality):
    err = refused(modality, hm.npy_header((2**38, 1024)), "too_large")
    assert "input.max_array_values" in err.detail


def test_an_npy_header_declaring_more_than_follows_is_truncated():
    refused("point", hm.npy_header((1000, 3)) + bytes(100), "truncated")


def test_pcd_and_ply_counts_are_bounded():
    err = refused("point", hm.pcd(count_z="100000000000"), "undecodable")
    assert "COUNT" in err.detail
    for data in ("binary", "ascii"):
        err = refused("point", hm.pcd(points="100000000000", data=data), "too_large")
        assert "input.max_points = 5,000,000" in err.detail
    refused("point", hm.ply_declaring(10**12), "too_large")


def test_text_tables_of_points_are_bounded_by_rows():
    table = "\n".join(f"{i} {i % 7} {i % 5}" for i in range(50)).encode()
    refused("point", table, "too_large", InputLimits(max_points=20))
    assert preprocess("point", table, source=SOURCE).shape == (8192, 3)


def test_text_over_its_byte_budget_is_too_large():
    err = refused("text", "é" * 600_000, "too_large")  # 600k characters, 1.2 MB of UTF-8
    assert "input.max_text_bytes = 1,048,576" in err.detail
    refused("text", b"a" * 2000, "too_large", InputLimits(max_text_bytes=1000))


# --------------------------------------------------------------------------- configuration


def test_limits_are_one_configuration_section(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHEBIND_INPUT__MAX_POINTS", "123")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[input]\nmax_image_pixels = 1000\n")
    limits = load_config(cfg).input
    assert limits.max_points == 123 and limits.max_image_pixels == 1000
    assert limits.max_bytes == InputLimits().max_bytes


def test_legacy_keyword_limits_override_the_section():
    raw = hm.png(40, 40, 2)
    refused("image", raw, "decompression_bomb", InputLimits(max_image_pixels=100))
    x = preprocess("image", raw, limits=InputLimits(max_image_pixels=100), max_pixels=10_000)
    assert x.shape == (3, 224, 224)
    with pytest.raises(InputError, match="input.max_bytes = 10"):
        preprocess("image", raw, max_bytes=10)


# --------------------------------------------------------------------------- peak memory

PEAK_CASES = {
    # name: (modality, builder, limits overrides, bound on the added peak RSS in MB)
    "flac_240s_6ch_192k": ("audio", lambda: hm.flac_declaring(240, 6, 192000), {}, 64),
    "wav_500_samples_8001Hz": ("audio", lambda: hm.wav(1, 500, 8001), {}, 64),
    "wav_8ch_10s_44101Hz": ("audio", lambda: hm.wav(8, 441010, 44101), {}, 160),
    "png_9000sq_rgba": ("image", lambda: hm.png(9000, 9000), {}, 64),
    "png_30000x2_allowed": (
        "image",
        lambda: hm.png(30000, 2, 2),
        {"max_image_aspect_ratio": 1e5},
        64,
    ),
    "png_7000sq_rgba_within_budget": ("image", lambda: hm.png(7000, 7000), {}, 480),
    "h264_4096sq": ("video", lambda: hm.h264(4096, 4096), {}, 64),
    "pt_40M_points": ("point", lambda: hm.torch_points_bomb(40_000_000), {}, 64),
    "npz_40M_points_lying": ("point", lambda: hm.npz_points_bomb(40_000_000, True), {}, 64),
    "npy_1TiB_header": ("point", lambda: hm.npy_header((2**38, 1024)), {}, 64),
}


def test_worst_cases_peak_memory_in_a_fresh_process(tmp_path):
    """All cases in one fresh process, one after another: for each, the peak RSS (``VmHWM``,
    reset through ``/proc/self/clear_refs`` just before the call) above the RSS before it.
    The 7000² RGBA PNG is the largest image the defaults accept."""
    cases = []
    for name, (modality, build, overrides, _bound) in PEAK_CASES.items():
        path = tmp_path / name
        path.write_bytes(build())
        cases.append((name, modality, str(path), overrides))
    result = run_isolated(
        f"""
        import gc, json
        from pathlib import Path
        import hostile_media
        from cachebind.config import InputLimits
        from cachebind.errors import InputError
        from cachebind.preprocess import preprocess

        def status_mb(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024

        preprocess("image", hostile_media.png(8, 8, 2))  # every import done before measuring
        out = {{}}
        for name, modality, path, overrides in {cases!r}:
            raw = Path(path).read_bytes()
            limits = InputLimits(**overrides)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak (VmHWM) restarts from the current RSS
            before = status_mb("VmRSS")
            try:
                preprocess(modality, raw, source=name, limits=limits)
                outcome = "tensor"
            except InputError as e:
                outcome = e.reason
            out[name] = [outcome, round(status_mb("VmHWM") - before, 1)]
        print(json.dumps(out))
        """,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(peaks, indent=1))
    for name, (outcome, added) in peaks.items():
        bound = PEAK_CASES[name][3]
        assert added < bound, f"{name}: +{added:.0f} MB > {bound} MB ({outcome})"
    assert peaks["pt_40M_points"][0] == "decompression_bomb"
    assert peaks["png_9000sq_rgba"][0] == "decompression_bomb"
    assert peaks["h264_4096sq"][0] == "too_large"
    assert peaks["png_30000x2_allowed"][0] == "tensor"
    assert peaks["wav_500_samples_8001Hz"][0] == "tensor"
