"""The images of a llava-mode (tokens mode: LLaVA-1.5, or SPHINX's mixed embedding)
generation, in order: each image input decoded once in the sandbox and prepared as each of the
model's encoders takes it (LLaVA's ``preprocessor_config.json``), each cached row named by id
read back as its stored patch tokens (no encoder run: the point of the cache), once the table's
recorded token layout is checked against the model's encoders.

Shared by ``/v1/generate`` and the OpenAI chat route. What the mode cannot take is refused
with a 422 that says why: a non-image medium (the tower is CLIP's vision model), a raw
embedding (the prompt takes patch tokens, not one vector), a mix weight (images are placed,
not averaged).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cachebind.bind.mixed import TokenSource
from cachebind.inject.llava_serve import (
    LlavaGenerator,
    PromptImage,
    PromptImages,
    TokenLayout,
    TokensGenerator,
)
from cachebind.inject.mixed_serve import MixedGenerator, recorded_differences
from cachebind.modalities import Modality
from cachebind.preprocess.extra import image_pixel_sets
from cachebind.serve.deps import Limits
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.inputs import decode_item
from cachebind.serve.schemas import InputItem
from cachebind.serve.state import ServeState

CACHED_ENCODER = "clip336"
"""The extra encoder whose cached tokens are LLaVA-1.5's tower's (CLIP ViT-L/14-336)."""


def llava_of(state: ServeState) -> TokensGenerator | None:
    """The served tokens-mode model when this server runs llava mode (None: adapter mode or
    no LLM)."""
    runtime = state.runtime
    generator = getattr(runtime, "generator", None)
    return generator if isinstance(generator, TokensGenerator) else None


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
            f"{where} is {modality}; llava mode (image encoders' tokens) takes images only",
        )
    if item.weight != 1.0:
        raise unprocessable(
            "unsupported_parameter",
            f"{where}.weight={item.weight}: llava mode places each image's tokens in the "
            "prompt; there is no mix to weigh",
        )


@dataclass(frozen=True)
class CachedRow:
    """An image named by its row id in the served table: its stored patch tokens stand in."""

    id: int
    where: str


ImageSource = InputItem | CachedRow


def token_column(table: Any) -> tuple[str | None, str, dict[str, Any]]:
    """(extra encoder or None, column, recorded token layout) of the table's patch tokens:
    LLaVA-1.5's tower's (``patch_tokens_clip336``) when it has them, else the trunk's."""
    metadata = table.metadata if isinstance(table.metadata, dict) else {}
    names = set(table.dataset.schema.names)
    extra = ((metadata.get("extra_encoders") or {}).get(CACHED_ENCODER) or {}).get("tokens")
    if extra and f"patch_tokens_{CACHED_ENCODER}" in names:
        return CACHED_ENCODER, f"patch_tokens_{CACHED_ENCODER}", dict(extra)
    if metadata.get("tokens") and "patch_tokens" in names:
        return None, "patch_tokens", dict(metadata["tokens"])
    raise unprocessable(
        "no_cached_tokens",
        f"table version {table.version} stores no patch tokens (cachebind embed --tokens "
        f"--extra-encoder {CACHED_ENCODER}=DIR); send the image itself",
    )


def check_recorded(recorded: dict[str, Any], layout: TokenLayout, states: int, column: str) -> None:
    """A 422 naming both when the cached tokens are not what this model's tower gives: the
    hidden state (compared as an index into the tower's ``states`` hidden states), CLS, shape."""
    try:
        layer = int(recorded["layer"])
        cached = (
            layer % states,
            bool(recorded["cls"]),
            int(recorded["patches"]),
            int(recorded["width"]),
        )
    except (KeyError, TypeError, ValueError):
        raise unprocessable("token_mismatch", f"{column}: unreadable record {recorded}") from None
    wanted = (layout.layer % states, layout.cls, layout.patches, layout.width)
    if cached != wanted:
        raise unprocessable(
            "token_mismatch",
            f"{column} holds hidden state {layer} (cls {cached[1]}) as {cached[2]} x "
            f"{cached[3]} tokens; this model's tower takes hidden state {layout.layer} (cls "
            f"{layout.cls}) as {layout.patches} x {layout.width}",
        )


async def cached_tokens(
    state: ServeState, generator: TokensGenerator, rows: Sequence[CachedRow]
) -> list[torch.Tensor]:
    """The stored patch tokens of ``rows`` in the served table version, in the generator's
    ``token_shape``."""
    _, snap = state.require_snapshot()
    table = snap.table
    ids = [row.id for row in rows]
    try:
        if isinstance(generator, MixedGenerator):
            encoders = [check_mixed_source(table, e.source, e.states) for e in generator.encoders]
            parts = [await asyncio.to_thread(table.patch_tokens, ids, e) for e in encoders]
            tokens = generator.join([torch.from_numpy(p) for p in parts])
        else:
            assert isinstance(generator, LlavaGenerator)
            encoder, column, recorded = token_column(table)
            check_recorded(recorded, generator.layout, generator.tower_states, column)
            tokens = torch.from_numpy(await asyncio.to_thread(table.patch_tokens, ids, encoder))
    except KeyError:
        found, _ = table.offsets(ids)
        missing = [row.where for row, ok in zip(rows, found, strict=True) if not ok]
        raise ApiError(
            404, "not_found", f"{', '.join(missing)}: no such row in table version {table.version}"
        ) from None
    return list(tokens)


def check_mixed_source(table: Any, source: TokenSource, states: int) -> str | None:
    """The table's name for ``source``'s tokens (None: ImageBind's trunk), after a 422 naming
    both when they are not the layer, shape or encoder the mixed projector learnt on."""
    encoder = None if source.name == "imagebind" else source.name
    try:
        record = table.tokens_record(encoder)
    except ValueError as exc:
        raise unprocessable("no_cached_tokens", f"{exc}; send the image itself") from None

    def state(layer: int | None) -> int | None:  # -2 and states - 2 are one hidden state
        return None if layer is None else layer % states

    learnt = (state(source.layer), False, source.patches, source.width)
    cached = (state(record.layer), record.cls, record.patches, record.width)
    if cached != learnt:
        raise unprocessable(
            "token_mismatch",
            f"{record.column} holds hidden state {record.layer} (cls {record.cls}) as "
            f"{record.patches} x {record.width} tokens; the mixed projector learnt on hidden "
            f"state {source.layer} (cls False) as {source.patches} x {source.width}",
        )
    if recorded_differences(source.identity, json.loads(record.identity or "null") or {}):
        raise unprocessable(
            "token_mismatch",
            f"{record.column} was embedded by another {source.name} than the mixed projector "
            f"learnt on (table records {record.identity}; the projector {source.identity})",
        )
    return encoder


async def prompt_images(
    state: ServeState,
    limits: Limits,
    generator: TokensGenerator,
    sources: Sequence[ImageSource],
    field: str = "inputs",
) -> PromptImages | None:
    """The prompt's images in order (None when there are none): each medium decoded in the
    sandbox with the model's preprocessing, each cached row's stored patch tokens."""
    if not sources:
        return None
    items = [s for s in sources if isinstance(s, InputItem)]
    rows = [s for s in sources if isinstance(s, CachedRow)]
    if len(sources) > limits.config.max_inputs:
        raise ApiError(
            413,
            "too_many_inputs",
            f"{field} name {len(sources)} images; the limit is {limits.config.max_inputs}",
        )
    decoded = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        check_item(item, where)
        decoded.append((*decode_item(item, where), where))
    tokens = await cached_tokens(state, generator, rows) if rows else []
    specs = generator.pixel_specs
    tasks = [
        asyncio.ensure_future(
            state.media.decode(m, raw, where, decoder=image_pixel_sets, specs=specs)
        )
        for m, raw, where in decoded
    ]
    try:
        pixels = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    # The encoders run here, on a worker thread: the scheduler's steps only project tokens.
    encoded: Iterator[torch.Tensor] = iter([])
    if pixels:
        stacks = [torch.stack(group) for group in zip(*pixels, strict=True)]
        encoded = iter(await asyncio.to_thread(generator.encode_images, stacks))
    stored = iter(tokens)
    return PromptImages(
        tuple(
            PromptImage(patch_tokens=next(stored if isinstance(source, CachedRow) else encoded))
            for source in sources
        )
    )
