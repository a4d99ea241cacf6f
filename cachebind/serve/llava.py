"""The images of a llava-mode (LLaVA-1.5, tokens mode) generation: each image input decoded in
the sandbox with the model's own preprocessing (``preprocessor_config.json``), in order.

Shared by ``/v1/generate`` and the OpenAI chat route. What the mode cannot take is refused
with a 422 that says why: a non-image medium (the tower is CLIP's vision model), a raw
embedding (the prompt takes patch tokens, not one vector), a mix weight (images are placed,
not averaged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from cachebind.inject.llava_serve import LlavaGenerator, PromptImages
from cachebind.modalities import Modality
from cachebind.preprocess.extra import image_pixels
from cachebind.serve.deps import Limits
from cachebind.serve.errors import unprocessable
from cachebind.serve.inputs import decode_item
from cachebind.serve.schemas import InputItem
from cachebind.serve.state import ServeState

MODE = "llava"


def llava_of(state: ServeState) -> LlavaGenerator | None:
    """The served LLaVA when this server runs llava mode (None: adapter mode or no LLM)."""
    runtime = state.runtime
    generator = getattr(runtime, "generator", None)
    return generator if isinstance(generator, LlavaGenerator) else None


def refuse_blend(**given: object) -> None:
    """A 422 naming cache-blend options sent to llava mode (they shape F~_M, which it lacks)."""
    named = [name for name, value in given.items() if value is not None]
    if named:
        raise unprocessable(
            "unsupported_parameter",
            f"{', '.join(named)}: the cache blend makes the adapter's F~_M; this server runs "
            "llava mode (visual tokens in the prompt), which has no blend",
        )


def check_item(item: InputItem, where: str) -> None:
    """Refuse what llava mode cannot place in a prompt, naming the reason."""
    if item.embedding is not None:
        raise unprocessable(
            "unsupported_input",
            f"{where} is a raw embedding; llava mode places an image's patch tokens in the "
            "prompt: send the image itself",
        )
    if item.modality is not Modality.IMAGE:
        modality = item.modality.value if item.modality else None
        raise unprocessable(
            "unsupported_modality",
            f"{where} is {modality}; llava mode (LLaVA-1.5's CLIP vision tower) takes images only",
        )
    if item.weight != 1.0:
        raise unprocessable(
            "unsupported_parameter",
            f"{where}.weight={item.weight}: llava mode places each image's tokens in the "
            "prompt; there is no mix to weigh",
        )


async def prompt_images(
    state: ServeState,
    limits: Limits,
    llava: LlavaGenerator,
    items: Sequence[InputItem],
    field: str = "inputs",
) -> PromptImages | None:
    """The decoded images of ``items`` [n, 3, S, S] (None when there are none)."""
    if not items:
        return None
    limits.check_inputs(items, field)
    decoded = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        check_item(item, where)
        decoded.append((*decode_item(item, where), where))
    tasks = [
        asyncio.ensure_future(
            state.media.decode(m, raw, where, decoder=image_pixels, spec=llava.preprocess)
        )
        for m, raw, where in decoded
    ]
    try:
        pixels = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return PromptImages(pixels=torch.stack(list(pixels)))
