"""Each extra encoder's own preprocessing (``embed.extra_encoders``), as its published
``preprocessor_config.json`` prescribes:

- ``clip336`` (openai/clip-vit-large-patch14-336): resize the shortest side to 336 (bicubic),
  centre crop 336 x 336, /255, CLIP's mean and std.
- ``dinov2`` (facebook/dinov2-*): resize the shortest side to 256 (bicubic), centre crop
  224 x 224, /255, ImageNet's mean and std.

Resizing and cropping are ImageBind's (``resize_center_crop``: torchvision's and transformers'
sizes, Pillow's bicubic), so a long thin hostile image costs no more here than there. Kept light
(PIL, numpy, torch): the decode sandbox imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.common import center_crop_box, resize_center_crop
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ExtraPreprocess:
    """One encoder's image transform: shortest side to ``resize``, centre crop ``crop``."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def record(self) -> dict[str, object]:
        """What a table records of it (the encoder's identity)."""
        return {
            "resize_shortest": self.resize,
            "resample": "bicubic",
            "center_crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
        }


IMAGEBIND_PREPROCESS = ExtraPreprocess(224, 224, CLIP_MEAN, CLIP_STD)
"""ImageBind's vision transform (``preprocess.image.image_tensor``) in these terms: the trunk's
pixels when it is one of several encoders of an image (SPHINX's mixed embedding)."""

PREPROCESS: dict[str, ExtraPreprocess] = {
    "clip336": ExtraPreprocess(336, 336, CLIP_MEAN, CLIP_STD),
    "dinov2": ExtraPreprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD),
}


def extra_tensor(img: Image.Image, name: str) -> torch.Tensor:
    """The RGB image ``img`` as encoder ``name`` takes it: float32 [3, crop, crop]."""
    return spec_tensor(img, PREPROCESS[name])


def image_pixels(
    modality: str,
    data: bytes,
    *,
    limits: InputLimits,
    spec: ExtraPreprocess,
    source: str = "<input>",
) -> torch.Tensor:
    """An untrusted image's bytes as ``spec`` prepares it (a decode-sandbox task: module-level,
    decoded under ``limits`` like every served image)."""
    if modality != "image":
        raise InputError(source, "unsupported_format", f"{modality} input is not an image")
    return spec_tensor(load_image(data, source, limits=limits), spec)


def image_pixel_sets(
    modality: str,
    data: bytes,
    *,
    limits: InputLimits,
    specs: tuple[ExtraPreprocess, ...],
    source: str = "<input>",
) -> tuple[torch.Tensor, ...]:
    """An untrusted image's bytes decoded once and prepared by each of ``specs`` (a model
    whose encoders each take their own transform of the image)."""
    if modality != "image":
        raise InputError(source, "unsupported_format", f"{modality} input is not an image")
    img = load_image(data, source, limits=limits)
    return tuple(spec_tensor(img, spec) for spec in specs)


def spec_tensor(img: Image.Image, spec: ExtraPreprocess) -> torch.Tensor:
    """The RGB image ``img`` through ``spec``: float32 [3, crop, crop]."""
    resized = resize_center_crop(img.convert("RGB"), spec.resize)
    if spec.crop != spec.resize:
        # A centre crop of the centre crop is the centre crop of the resized image: the
        # offsets differ by a whole (even) number of pixels, so they round alike.
        resized = resized.crop(center_crop_box(spec.resize, spec.resize, spec.crop))
    x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)
