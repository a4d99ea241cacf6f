"""Prompt templates for zero-shot labels: CLIP's ImageNet set, and reading a user's file.

``{}`` stands for the label. Templates are filled with ``str.replace``, never ``str.format``: a
label or template holding other braces is text, not a format field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cachebind.errors import CachebindError

PLACEHOLDER = "{}"

# The 80 templates of CLIP's ImageNet prompt ensemble ("Prompt_Engineering_for_ImageNet"),
# in their published order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


class LabelSetError(CachebindError, ValueError):
    """A label set or template list that cannot be used; the message names the problem."""


def fill(template: str, label: str) -> str:
    return template.replace(PLACEHOLDER, label)


def check_labels(labels: Sequence[str], max_labels: int) -> list[str]:
    """The labels stripped, refused when empty, repeated or more than ``max_labels``."""
    out = [label.strip() for label in labels]
    if not out:
        raise LabelSetError("the label set is empty: give at least two labels")
    if len(out) > max_labels:
        raise LabelSetError(f"{len(out)} labels: at most {max_labels} (analysis.max_labels)")
    for i, label in enumerate(out):
        if not label:
            raise LabelSetError(f"label {i + 1} is empty")
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        if label in seen:
            first = seen[label] + 1
            raise LabelSetError(f"label {label!r} is given twice (lines {first}, {i + 1})")
        seen[label] = i
    return out


def check_templates(templates: Sequence[str], max_templates: int) -> list[str]:
    """Templates that each hold ``{}``; refused when none or more than ``max_templates``."""
    out = [t.strip() for t in templates]
    if not out:
        raise LabelSetError("the template list is empty")
    if len(out) > max_templates:
        raise LabelSetError(
            f"{len(out)} templates: at most {max_templates} (analysis.max_templates)"
        )
    for i, template in enumerate(out):
        if PLACEHOLDER not in template:
            raise LabelSetError(f"template {i + 1} ({template!r}) has no {{}} for the label")
    return out


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file (``#`` starts a comment line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LabelSetError(f"{what} file {p} is not UTF-8 text: {exc}") from exc
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
