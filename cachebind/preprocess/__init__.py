"""Raw user input -> ImageBind model input tensors, one module per modality.

``preprocess(modality, data, source=...)`` returns ONE sample's input (no batch axis):

=========  ==========================  =====================================================
modality   shape / dtype               module (decode stage -> transform stage)
=========  ==========================  =====================================================
image      [3, 224, 224] float32       image.load_image -> image.image_tensor
text       [77] int64                  text.load_text -> text.text_tensor
audio      [3, 1, 128, 204] float32    audio.load_audio -> audio.audio_tensor
video      [15, 3, 2, 224, 224] f32    video.load_video -> video.video_tensor
depth      [1, 224, 224] float32       depth.load_depth -> depth_to_disparity -> depth_tensor
thermal    [1, 224, 224] float32       thermal.load_thermal -> thermal.thermal_tensor
imu        [6, 2000] float32           imu.load_imu -> imu.imu_tensor
point      [8192, 3] float32           pointcloud.load_point_cloud -> point_cloud_tensor
=========  ==========================  =====================================================

Every decode stage takes ``limits: InputLimits`` (``Settings.input``: byte, pixel, aspect ratio,
duration, channel, frame, decompressed-size and point budgets) and checks them from headers
before decoding where a format declares sizes, and again on what is decoded.

Each decode stage raises ``InputError(source, reason, detail)`` for unusable input (reasons:
``undecodable``, ``truncated``, ``empty``, ``too_large``, ``decompression_bomb``,
``unsupported_format``, ``wrong_type``, ``wrong_shape``, ``not_found``, ``unreadable``); a
transform stage only sees decoded data, so an error there is a bug, not bad input. The Ray
embedding job may call the two stages separately to know where a sample failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.modalities import Modality
from cachebind.preprocess.audio import audio_tensor, load_audio
from cachebind.preprocess.common import resolve_limits
from cachebind.preprocess.depth import depth_tensor, depth_to_disparity, load_depth
from cachebind.preprocess.image import image_tensor, load_image
from cachebind.preprocess.imu import imu_tensor, load_imu
from cachebind.preprocess.pointcloud import NUM_POINTS, load_point_cloud, point_cloud_tensor
from cachebind.preprocess.text import load_text, text_tensor
from cachebind.preprocess.thermal import load_thermal, thermal_tensor
from cachebind.preprocess.video import load_video, video_tensor

PREPROCESS_VERSION = "1"
"""Bumped whenever any modality's output for the same input changes (recorded in tables)."""

INPUT_SHAPES: dict[Modality, tuple[int, ...]] = {
    Modality.IMAGE: (3, 224, 224),
    Modality.TEXT: (77,),
    Modality.AUDIO: (3, 1, 128, 204),
    Modality.VIDEO: (15, 3, 2, 224, 224),
    Modality.DEPTH: (1, 224, 224),
    Modality.THERMAL: (1, 224, 224),
    Modality.IMU: (6, 2000),
    Modality.POINT: (NUM_POINTS, 3),  # Point-Bind (imagebind_w3D.pth)
}
"""The per-sample model input shape of each modality (a batch stacks these on axis 0)."""

_FILE_TYPES = (bytes, bytearray, memoryview, str, Path)
_ACCEPTS: dict[Modality, tuple[type, ...]] = {
    Modality.IMAGE: (*_FILE_TYPES, Image.Image),
    Modality.TEXT: (str, bytes, bytearray, memoryview),
    Modality.AUDIO: _FILE_TYPES,
    Modality.VIDEO: _FILE_TYPES,
    Modality.DEPTH: (*_FILE_TYPES, Image.Image, np.ndarray),
    Modality.THERMAL: (*_FILE_TYPES, Image.Image, np.ndarray),
    Modality.IMU: (*_FILE_TYPES, np.ndarray),
    Modality.POINT: (*_FILE_TYPES, np.ndarray),
}


def _accepts(modality: Modality, data: Any) -> bool:
    # A bool, not an isinstance narrowing: each loader below states its own input types.
    return isinstance(data, _ACCEPTS[modality])


def preprocess(
    modality: Modality | str,
    data: Any,
    *,
    source: str = "<input>",
    limits: InputLimits | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """One raw input -> its model input tensor (shapes in ``INPUT_SHAPES``).

    ``data``: bytes or a file path (str/Path; for text, a str is the text itself), a PIL image
    (image, depth, thermal) or a NumPy array (depth in metres, thermal, IMU, point ``[N, 3+]``).
    ``source`` names the input in errors. ``limits`` (``Settings.input``) bounds what is
    decoded; ``max_pixels`` / ``max_bytes``, when given, override its ``max_image_pixels`` /
    ``max_bytes`` (the embedding job's ``embed.max_image_pixels`` / ``embed.max_image_bytes``).
    """
    limits = resolve_limits(limits, max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        modality = Modality(modality)
    except ValueError as e:
        raise InputError(source, "unsupported_format", f"unknown modality {modality!r}") from e
    if not _accepts(modality, data):
        raise InputError(
            source, "wrong_type", f"{modality.value} input cannot be a {type(data).__name__}"
        )
    if modality is Modality.IMAGE:
        return image_tensor(load_image(data, source, limits=limits))
    if modality is Modality.TEXT:
        return text_tensor(load_text(data, source, limits=limits))
    if modality is Modality.AUDIO:
        return audio_tensor(load_audio(data, source, limits=limits))
    if modality is Modality.VIDEO:
        return video_tensor(load_video(data, source, limits=limits))
    if modality is Modality.DEPTH:
        return depth_tensor(depth_to_disparity(load_depth(data, source, limits=limits)))
    if modality is Modality.THERMAL:
        return thermal_tensor(load_thermal(data, source, limits=limits))
    if modality is Modality.POINT:
        return point_cloud_tensor(load_point_cloud(data, source, limits=limits))
    return imu_tensor(load_imu(data, source, limits=limits))


__all__ = [
    "INPUT_SHAPES",
    "InputLimits",
    "PREPROCESS_VERSION",
    "audio_tensor",
    "depth_tensor",
    "depth_to_disparity",
    "image_tensor",
    "imu_tensor",
    "load_audio",
    "load_depth",
    "load_image",
    "load_imu",
    "load_point_cloud",
    "load_text",
    "load_thermal",
    "load_video",
    "point_cloud_tensor",
    "preprocess",
    "text_tensor",
    "thermal_tensor",
    "video_tensor",
]
