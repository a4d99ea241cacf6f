"""LLaVA-1.5's prompt: the llava-hf chat template and the token ids with one image-token id per
visual token.

The llava-hf chat template renders a conversation as ``USER: <image>\\n{text} ASSISTANT:``:
each non-system turn opens with its role in capitals and ``": "``, that turn's images first
(``<image>\\n`` each), then its text parts (each followed by a space); a system turn is its text
alone; the generation prompt is ``ASSISTANT:``. Ids are built as the original LLaVA's
``tokenizer_image_token`` builds them: the text between images is tokenised piece by piece
(sentencepiece, as in training), BOS once at the start, and each ``<image>`` becomes the image
token's id repeated once per visual token (``expand_image_placeholders``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cachebind.errors import InputError
from cachebind.inject.placement import expand_image_placeholders
from cachebind.inject.tokenizer import Tokenizer

IMAGE_INDEX = -200
"""LLaVA's IMAGE_TOKEN_INDEX: the id of a visual position where no ``<image>`` piece exists in
the vocabulary (a LLaMA trained on the cache's tokens by ``train llava-pretrain``)."""

IMAGE = "<image>"
GENERATION_PROMPT = "ASSISTANT:"


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` (system, user, assistant), its images and its text parts."""

    role: str
    texts: Sequence[str]
    images: int = 0


def render_turns(turns: Sequence[Turn]) -> str:
    """The conversation as llava-hf's chat template renders it, generation prompt included."""
    out = []
    for turn in turns:
        if turn.role != "system":
            out.append(f"{turn.role.upper()}: ")
        out.append(f"{IMAGE}\n" * turn.images)
        out.extend(f"{text} " for text in turn.texts)
    return "".join(out) + GENERATION_PROMPT


def llava_prompt(prompt: str, images: int) -> str:
    """One user turn: ``USER: <image>\\n{prompt} ASSISTANT:`` (its images first)."""
    return render_turns([Turn("user", [prompt], images)])


def llava_ids(
    tokenizer: Tokenizer, text: str, images: int, image_token_id: int, per_image: int
) -> list[int]:
    """BOS and the ids of ``text`` whose every ``<image>`` stands for one of ``images`` images
    (``per_image`` image-token ids each). A count that differs is refused with both."""
    pieces = text.split(IMAGE)
    if len(pieces) - 1 != images:
        raise InputError(
            "prompt",
            "image_count",
            f"the prompt holds {len(pieces) - 1} {IMAGE} but {images} image(s) were given",
        )
    ids = [tokenizer.bos_id]
    for i, piece in enumerate(pieces):
        if i:
            ids.append(image_token_id)
        if piece:
            ids.extend(tokenizer.encode(piece, bos=False))
    return expand_image_placeholders(ids, image_token_id, per_image)
