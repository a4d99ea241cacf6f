"""Depth (-> disparity), thermal and IMU preprocessing."""

from __future__ import annotations

import io

import fixtures_media as fm
import numpy as np
import pytest
import torch
from PIL import Image

from cachebind.preprocess import preprocess
from cachebind.preprocess.depth import DepthCamera, depth_to_disparity, load_depth
from cachebind.preprocess.imu import imu_tensor, load_imu


def png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- depth


def test_constant_depth_becomes_constant_disparity():
    x = preprocess("depth", png16(np.full((240, 320), 2000)))  # 2 m everywhere
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32
    expected = 0.075 * 518.857901 / 2.0
    torch.testing.assert_close(x, torch.full((1, 224, 224), expected), atol=1e-4, rtol=0)


def test_missing_and_far_depth_are_clipped_before_inversion():
    depth_m = np.array([[0.0, 0.005, 1.0, 80.0]], np.float32)
    disp = depth_to_disparity(depth_m)
    bf = 0.075 * 518.857901
    np.testing.assert_allclose(disp, [[bf / 0.01, bf / 0.01, bf / 1.0, bf / 50.0]], rtol=1e-6)


def test_png_in_millimetres_equals_float_metres_and_camera_is_configurable():
    mm = np.broadcast_to(np.linspace(500, 4000, 320).round(), (240, 320)).astype(np.uint16)
    from_png = preprocess("depth", png16(mm))
    from_array = preprocess("depth", mm.astype(np.float32) / 1000.0)
    torch.testing.assert_close(from_png, from_array, atol=1e-4, rtol=1e-6)
    cam = DepthCamera(baseline_m=0.095, focal_length_px=600.0)
    metres = load_depth(png16(mm), camera=cam)
    np.testing.assert_allclose(depth_to_disparity(metres, cam)[0, 0], 0.095 * 600.0 / 0.5)


def test_depth_ramp_keeps_near_on_the_left():
    x = preprocess("depth", fm.depth_png16_bytes(size=(320, 240), near_mm=500, far_mm=4000))
    assert x[0, :, 0].mean() > x[0, :, -1].mean()  # nearer = larger disparity


# ----------------------------------------------------------------------------- thermal


@pytest.mark.parametrize(
    ("arr", "value"),
    [
        (np.full((256, 320), 128, np.uint8), 128 / 255),
        (np.full((256, 320), 32768, np.uint16), 32768 / 65535),
    ],
    ids=["8-bit", "16-bit"],
)
def test_constant_thermal_is_scaled_to_unit_range(arr, value):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    x = preprocess("thermal", buf.getvalue())
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((1, 224, 224), value), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 16])
def test_thermal_images_keep_the_warm_blob_in_the_centre(bits):
    x = preprocess("thermal", fm.thermal_bytes(bits))
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[0, 100:124, 100:124].mean() > x[0, :20, :20].mean() + 0.3


def test_thermal_8_and_16_bit_versions_agree():
    a = preprocess("thermal", fm.thermal_bytes(8))
    b = preprocess("thermal", fm.thermal_bytes(16))
    assert (a - b).abs().max() < 0.01


# ----------------------------------------------------------------------------- IMU


def test_imu_of_2000_steps_passes_through_unchanged():
    arr = fm.imu_array(2000)
    torch.testing.assert_close(preprocess("imu", arr), torch.from_numpy(arr), atol=0, rtol=0)


def test_imu_is_linearly_resampled_with_ends_kept():
    arr = np.stack([np.linspace(0.0, 1.0, 11)] * 6).astype(np.float32)  # a ramp over 11 steps
    x = imu_tensor(arr)
    assert x.shape == (6, 2000) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.linspace(0.0, 1.0, 2000), atol=1e-6, rtol=0)


def test_csv_columns_csv_rows_and_npy_agree(tmp_path):
    arr = fm.imu_array(1000, seed=2)
    expected = preprocess("imu", arr)
    sources = {
        "columns.csv": fm.imu_csv_bytes(arr, "columns"),
        "rows.csv": fm.imu_csv_bytes(arr, "rows"),
        "noheader.csv": fm.imu_csv_bytes(arr, "columns", header=False),
        "a.npy": fm.npy_bytes(arr),
        "t.npy": fm.npy_bytes(arr.T),
    }
    for name, raw in sources.items():
        got = preprocess("imu", fm.write(tmp_path / name, raw), source=name)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=name)


def test_imu_loader_returns_channels_first():
    assert load_imu(fm.npy_bytes(fm.imu_array(300).T)).shape == (6, 300)
