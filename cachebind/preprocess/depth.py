"""Depth maps -> the depth trunk's [1, 224, 224] disparity input.

ImageBind's released code has no depth loader. Its depth trunk was trained (as Omnivore's) on
SUN RGB-D depth converted to **disparity**, for scale normalisation; the conversion the Omnivore
authors published (facebookresearch/omnivore issue 12) is

    depth_m   = raw / 1000                    (16-bit PNG in millimetres)
    depth_m   = clip(depth_m, 0.01, 50)
    disparity = baseline * focal_length / depth_m

with the sensor's baseline (0.075 m for Kinect v1/v2, 0.095 m for RealSense/Xtion) and focal
length in pixels (``fx`` of the camera intrinsics). Defaults here are a Kinect v1 / NYU-v2 camera
(baseline 0.075 m, fx 518.857901 px); pass your camera's values through ``DepthCamera``.
The disparity map is then resized like an image (short side 224, bicubic on float32 values, so no
8-bit rounding) and centre cropped to 224. No further normalisation is applied (none is
published); treat depth embeddings as approximate when the camera differs from the defaults.

Accepted inputs: a 16-bit PNG (``I;16``, millimetres), a PIL image of mode ``I;16``/``I``
(millimetres) or ``F`` (metres), a 2-D NumPy array (float: metres; uint16/int: millimetres).
8-bit images are refused: they carry no metric scale (often they are already a relative
visualisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.common import RawInput, resize_center_crop, resolve_limits
from cachebind.preprocess.image import check_image_size, open_image


@dataclass(frozen=True)
class DepthCamera:
    """The constants of ``disparity = baseline * focal_length / depth``."""

    baseline_m: float = 0.075
    focal_length_px: float = 518.857901
    min_depth_m: float = 0.01
    max_depth_m: float = 50.0
    millimetres_per_unit: float = 1.0
    """Raw integer depth is ``millimetres_per_unit`` mm per unit (1.0 for standard 16-bit PNGs)."""


DEFAULT_CAMERA = DepthCamera()


def load_depth(
    data: RawInput | Image.Image | np.ndarray,
    source: str = "<input>",
    *,
    camera: DepthCamera = DEFAULT_CAMERA,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """The decode stage: ``data`` -> [H, W] float32 depth in metres."""
    limits = resolve_limits(limits, max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(data, np.ndarray):
        arr = data
    else:
        img = open_image(data, source, limits=limits)
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            arr = np.asarray(img)
        else:
            raise InputError(
                source,
                "unsupported_format",
                f"depth must be a 16-bit PNG in millimetres or float metres, got mode {img.mode}",
            )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise InputError(source, "wrong_shape", f"depth must be [H, W], got {list(arr.shape)}")
    check_image_size((arr.shape[1], arr.shape[0]), source, limits)
    if np.issubdtype(arr.dtype, np.floating):
        metres = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.dtype.itemsize == 1:
            raise InputError(source, "unsupported_format", "8-bit depth has no metric scale")
        metres = arr.astype(np.float32) * np.float32(camera.millimetres_per_unit / 1000.0)
    else:
        raise InputError(source, "wrong_type", f"depth array of dtype {arr.dtype}")
    if not np.isfinite(metres).all():
        # NaN/inf mark missing depth in some float exports: treat them as "too far".
        metres = np.nan_to_num(metres, nan=camera.max_depth_m, posinf=camera.max_depth_m)
        metres = np.where(np.isneginf(metres), camera.min_depth_m, metres)
    return metres


def depth_to_disparity(depth_m: np.ndarray, camera: DepthCamera = DEFAULT_CAMERA) -> np.ndarray:
    """``baseline * focal / clip(depth, min, max)``: [H, W] float32 disparity in pixels.

    Zero depth (no measurement) clips to ``min_depth_m``, as the published conversion does.
    """
    clipped = np.clip(depth_m, camera.min_depth_m, camera.max_depth_m)
    return (camera.baseline_m * camera.focal_length_px / clipped).astype(np.float32)


def depth_tensor(disparity: np.ndarray) -> torch.Tensor:
    """The transform stage: [H, W] disparity -> [1, 224, 224] float32 (resize + centre crop)."""
    img = Image.fromarray(np.ascontiguousarray(disparity, dtype=np.float32), mode="F")
    crop = resize_center_crop(img)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32).copy())[None]


def preprocess_depth(
    data: RawInput | Image.Image | np.ndarray,
    source: str = "<input>",
    *,
    camera: DepthCamera = DEFAULT_CAMERA,
) -> torch.Tensor:
    """``load_depth``, ``depth_to_disparity``, ``depth_tensor``: one map -> [1, 224, 224]."""
    return depth_tensor(depth_to_disparity(load_depth(data, source, camera=camera), camera))
