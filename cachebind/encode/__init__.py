"""ImageBind encoder: the reference model layout, presets, weights and the batched Encoder."""

from cachebind.encode.encoder import Encoder
from cachebind.encode.imagebind import PRESETS, ImageBindModel, build_model
from cachebind.encode.weights import (
    KNOWN_WEIGHTS,
    WeightsError,
    download_weights,
    file_sha256,
    load_checkpoint,
)

__all__ = [
    "KNOWN_WEIGHTS",
    "PRESETS",
    "Encoder",
    "ImageBindModel",
    "WeightsError",
    "build_model",
    "download_weights",
    "file_sha256",
    "load_checkpoint",
]
