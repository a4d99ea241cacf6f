"""SPHINX's high-resolution views: five 224-px images of one 448-px image.

SPHINX (LLaMA2-Accessory, ``T_padded_resize`` and ``encode_image`` of its ensemble models)
pads the image to a square with the CLIP mean colour (the image centred on the padded axis),
resizes it to 448 x 448 (bicubic), applies ToTensor and the CLIP Normalize, and then encodes
five 224 x 224 images, in this order:

0. the whole 448 image resized to 224 (``F.interpolate(..., mode="bicubic")`` on the
   normalised tensor: no antialiasing, ``align_corners=False``);
1. its top-left quarter, 2. top-right, 3. bottom-left, 4. bottom-right (plain slices).

The release runs the interpolation in float16 on the GPU; here it is float32 on the CPU, the
same kernel at a higher precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from cachebind.config import SPHINX_VIEWS
from cachebind.preprocess.common import IMAGE_SIZE
from cachebind.preprocess.image import CLIP_MEAN, normalised_tensor

HIGH_RES = 2 * IMAGE_SIZE  # 448: four 224 quarters
QUARTERS = ("top-left", "top-right", "bottom-left", "bottom-right")
VIEW_NAMES = ("whole", *QUARTERS)
assert len(VIEW_NAMES) == SPHINX_VIEWS

SPHINX_AUGMENTATION = {
    "transform": "SPHINX five views",
    "pad": "square, CLIP mean colour",
    "size": HIGH_RES,
    "interpolation": "bicubic",
    "views": list(VIEW_NAMES),
}
"""Recorded in a table's metadata (``views.augmentation``) for ``embed.view_set = "sphinx"``."""


def pad_to_square(img: Image.Image) -> Image.Image:
    """``img`` centred on a square of the CLIP mean colour (LLaVA's and SPHINX's padding)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    colour = tuple(int(c * 255) for c in CLIP_MEAN)
    square = Image.new(img.mode, (side, side), colour)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def sphinx_views(img: Image.Image) -> list[torch.Tensor]:
    """The five normalised float32 [3, 224, 224] views of an RGB image, in SPHINX's order."""
    if img.mode != "RGB":
        raise ValueError(f"sphinx_views expects an RGB image, got mode {img.mode}")
    high = pad_to_square(img).resize((HIGH_RES, HIGH_RES), Image.Resampling.BICUBIC)
    x = normalised_tensor(high)  # [3, 448, 448]
    whole = F.interpolate(x[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic")[0]
    s = IMAGE_SIZE
    quarters = [x[:, :s, :s], x[:, :s, s:], x[:, s:, :s], x[:, s:, s:]]
    return [whole.contiguous(), *(q.contiguous() for q in quarters)]
