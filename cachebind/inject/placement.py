"""Where visual tokens enter the prompt: the positions of the ``<image>`` token.

LLaVA-1.5 writes ``<image>`` once in the prompt (``USER: <image>\\n... ASSISTANT:``); the
llava-hf processor repeats its id ``image_seq_length`` times (576 for ViT-L/14-336), and the
model overwrites the embedding at each repeated position with one visual token, in order: the
first image's tokens fill the first positions of the first row, and so on, row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expand_image_placeholders(ids: Sequence[int], image_token_id: int, per_image: int) -> list[int]:
    """``ids`` with every ``image_token_id`` repeated ``per_image`` times (one per visual token)."""
    if per_image < 1:
        raise ValueError(f"an image has {per_image} visual tokens; it needs at least one")
    out: list[int] = []
    for i in ids:
        out.extend([i] * per_image if i == image_token_id else [i])
    return out


def place_visual_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, visual: torch.Tensor
) -> torch.Tensor:
    """``embeds`` [B, S, D] with the positions where ``input_ids`` [B, S] is ``image_token_id``
    replaced, in row-major order, by ``visual`` [images, tokens, D] (a new tensor)."""
    mask = input_ids == image_token_id
    slots, dim = int(mask.sum()), embeds.shape[-1]
    if visual.shape[-1] != dim:
        raise ValueError(f"visual tokens are {visual.shape[-1]} wide, the LLM's embeddings {dim}")
    flat = visual.reshape(-1, dim)
    if flat.shape[0] != slots:
        raise ValueError(
            f"the prompt has {slots} image-token positions but {visual.shape[0]} image(s) give "
            f"{flat.shape[0]} visual tokens (expand each <image> to the tokens of one image)"
        )
    out = embeds.clone()
    out[mask] = flat.to(dtype=out.dtype, device=out.device)
    return out
