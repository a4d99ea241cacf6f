"""ImageBind encoder: the reference model layout, presets, weights and the batched Encoder."""

from cachebind.encode.encoder import Encoder
from cachebind.encode.imagebind import PRESETS, ImageBindModel, build_model
from cachebind.encode.pointbind import (
    PointBindModel,
    build_pointbind,
    load_encoder_checkpoint,
    split_w3d_state,
)
from cachebind.encode.weights import (
    KNOWN_WEIGHTS,
    download_weights,
    file_sha256,
    load_checkpoint,
)
from cachebind.errors import WeightsError

__all__ = [
    "KNOWN_WEIGHTS",
    "PRESETS",
    "Encoder",
    "ImageBindModel",
    "PointBindModel",
    "WeightsError",
    "build_model",
    "build_pointbind",
    "download_weights",
    "file_sha256",
    "load_checkpoint",
    "load_encoder_checkpoint",
    "split_w3d_state",
]
