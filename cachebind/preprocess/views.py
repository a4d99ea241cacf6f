"""Augmented views of an image: the release's training crop, seeded per (sample id, view index).

ImageBind-LLM's stage-1 training (``imagebind_LLM/data/dataset.py``, ``transform_train``) feeds
the encoder ``RandomResizedCrop(size=(224, 224), scale=(0.9, 1.0), ratio=(0.75, 1.3333),
interpolation=BICUBIC)`` then ``ToTensor`` and the CLIP ``Normalize``; the cache's ``vector`` is
the evaluation transform's centre crop instead. ``cachebind embed --views N`` stores N of these
crops' features beside it (``view_vectors``) so that training can sample one per epoch.

The crop box follows torchvision's ``RandomResizedCrop.get_params``: up to 10 draws of an area
fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` until the box fits, else the
centre crop clamped to ``ratio``; the box is then cut out and resized to 224 x 224 bicubic
(torchvision resizes PIL images with Pillow, as here). The random numbers come from
``numpy.random.default_rng([VIEW_SEED, id, view])`` instead of torch's global generator, so a
resumed or re-run job crops, and therefore writes, exactly the same rows.

``embed.view_set = "sphinx"`` stores SPHINX's five high-resolution views instead
(``cachebind.preprocess.subimages``); ``view_set_tensors`` gives either set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from cachebind.preprocess.common import IMAGE_SIZE
from cachebind.preprocess.image import normalised_tensor
from cachebind.preprocess.subimages import SPHINX_AUGMENTATION, sphinx_views

SCALE = (0.9, 1.0)
RATIO = (0.75, 1.3333)  # the release writes 1.3333, not 4/3
ATTEMPTS = 10
VIEW_SEED = 16  # keeps these streams apart from other seeded uses of an id

AUGMENTATION = {
    "transform": "RandomResizedCrop",
    "size": IMAGE_SIZE,
    "scale": list(SCALE),
    "ratio": list(RATIO),
    "interpolation": "bicubic",
    "seed": f"numpy default_rng([{VIEW_SEED}, id, view])",
}
"""Recorded in a table's metadata (``views.augmentation``) when it has views."""


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of one random resized crop of a width x height image."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # No draw fitted (a very long or thin image): the centre, clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, round(width / min(RATIO))
    elif in_ratio > max(RATIO):
        w, h = round(height * max(RATIO)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def view_rng(sid: int, view: int) -> np.random.Generator:
    """The generator of view ``view`` (0-based) of the sample with row id ``sid``."""
    return np.random.default_rng([VIEW_SEED, int(sid), int(view)])


def view_tensor(img: Image.Image, sid: int, view: int) -> torch.Tensor:
    """View ``view`` of the RGB image of sample ``sid``: float32 [3, 224, 224], normalised as the
    centre crop. One crop is alive at a time (at most the image's size, for a huge image)."""
    if img.mode != "RGB":
        raise ValueError(f"view_tensor expects an RGB image, got mode {img.mode}")
    box = crop_box(img.width, img.height, view_rng(sid, view))
    crop = img.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return normalised_tensor(crop)


def view_tensors(img: Image.Image, sid: int, views: int) -> list[torch.Tensor]:
    """Views ``0 .. views-1`` of sample ``sid``."""
    return [view_tensor(img, sid, v) for v in range(views)]


def augmentation(view_set: str) -> dict[str, Any]:
    """What a table records of its views (``views.augmentation``) for ``embed.view_set``."""
    return SPHINX_AUGMENTATION if view_set == "sphinx" else AUGMENTATION


def view_set_tensors(img: Image.Image, sid: int, views: int, view_set: str) -> list[torch.Tensor]:
    """The ``views`` tensors of ``embed.view_set`` for sample ``sid``: seeded random crops, or
    SPHINX's five views (the settings make ``views`` 5 for that set)."""
    if view_set == "sphinx":
        return sphinx_views(img)[:views]
    return view_tensors(img, sid, views)


def trainable_views(metadata_views: dict[str, Any] | None) -> bool:
    """Whether training may draw an epoch's F_M from a table's views (its ``views`` metadata):
    crops of the whole image may, SPHINX's sub-images (mostly quarters) may not."""
    recorded = (metadata_views or {}).get("augmentation") or {}
    return bool(recorded.get("transform") != SPHINX_AUGMENTATION["transform"])
