"""Thermal images -> the thermal trunk's [1, 224, 224] input.

ImageBind's released code has no thermal loader; its thermal trunk was trained on LLVIP's
single-channel infrared images. We use the image geometry (short side 224 bicubic, centre crop
224) on the single channel and scale intensities to [0, 1] (``ToTensor``): 8-bit / 255,
16-bit / 65535. No mean/std normalisation is applied (none is published). 8-bit greyscale is
resized in Pillow's ``L`` mode exactly as torchvision would; 16-bit in float (``F``) so that no
precision is lost. Colour images (false-colour palettes) are converted to luminance (``L``),
which is an approximation of the sensor value.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.common import RawInput, resize_center_crop, resolve_limits
from cachebind.preprocess.image import check_image_size, open_image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_thermal(
    data: RawInput | Image.Image | np.ndarray,
    source: str = "<input>",
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> Image.Image:
    """The decode stage: ``data`` -> a single-channel PIL image, mode ``L`` (8-bit) or ``F``
    (16-bit input scaled to [0, 1])."""
    limits = resolve_limits(limits, max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(data, np.ndarray):
        arr = data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data
        if arr.ndim != 2 or min(arr.shape) == 0:
            raise InputError(source, "wrong_shape", f"thermal must be [H, W], got {data.shape}")
        check_image_size((arr.shape[1], arr.shape[0]), source, limits)
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, "L")
        if arr.dtype == np.uint16:
            return Image.fromarray((arr.astype(np.float32) / 65535.0), "F")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise InputError(source, "unsupported_format", "float thermal must be in [0, 1]")
            return Image.fromarray(arr.astype(np.float32), "F")
        raise InputError(source, "wrong_type", f"thermal array of dtype {arr.dtype}")
    img = open_image(data, source, limits=limits)
    if img.mode == "L":
        return img
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(source, "unsupported_format", f"{img.mode} values outside 16 bits")
        return Image.fromarray(arr / 65535.0, "F")
    if img.mode == "F":
        raise InputError(source, "unsupported_format", "float images have no thermal scale")
    try:
        return img.convert("L")
    except (ValueError, OSError) as e:
        raise InputError(source, "unsupported_format", f"mode {img.mode}: {e}") from e


def thermal_tensor(img: Image.Image) -> torch.Tensor:
    """The transform stage: ``L``/``F`` image -> [1, 224, 224] float32 in [0, 1]."""
    crop = resize_center_crop(img)
    arr = np.asarray(crop, dtype=np.float32)
    # 8-bit: ToTensor's /255; float: clip the bicubic overshoot at sharp edges.
    arr = arr / 255.0 if img.mode == "L" else np.clip(arr, 0.0, 1.0)
    return torch.from_numpy(arr.copy())[None]


def preprocess_thermal(
    data: RawInput | Image.Image | np.ndarray, source: str = "<input>"
) -> torch.Tensor:
    """``load_thermal`` then ``thermal_tensor``."""
    return thermal_tensor(load_thermal(data, source))
