"""Query inputs -> F_M: decode each input, embed it, and mix several with their weights.

F_M = Σ (w_i / (Σw + 1e-6)) · normalize(F_i) (docs/REFERENCE.md), so a single input of any weight is
its own (unit-norm) embedding scaled by w/(w + 1e-6).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachebind.modalities import Modality
from cachebind.serve.errors import unprocessable
from cachebind.serve.schemas import InputItem

EmbedOne = Callable[[Modality, Any, str], Awaitable[np.ndarray]]


def decode_item(item: InputItem, where: str) -> tuple[Modality, Any]:
    """(modality, raw input) of a text or data item; raw media are bytes, never a path."""
    assert item.modality is not None
    if item.text is not None:
        if not item.text.strip():
            raise unprocessable("empty_input", f"{where}.text is empty")
        return item.modality, item.text
    assert item.data is not None
    raw = media_bytes(item.data, f"{where}.data")
    if not raw:
        raise unprocessable("empty_input", f"{where}.data decodes to zero bytes")
    return item.modality, raw


def media_bytes(data: str, where: str) -> bytes:
    """The bytes of a medium sent as base64 or as a ``data:`` URL (base64 or percent-encoded;
    its declared media type is not trusted: the decoder sniffs the bytes)."""
    if data[:5].lower() == "data:":
        head, comma, payload = data.partition(",")
        if not comma:
            raise unprocessable(
                "bad_data_url", f"{where} is a data: URL with no ',' before its data"
            )
        if not head.lower().endswith(";base64"):
            return urllib.parse.unquote_to_bytes(payload)
        data = payload
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise unprocessable("bad_base64", f"{where} is not valid base64: {exc}") from exc


def raw_embedding(item: InputItem, where: str, dim: int) -> np.ndarray:
    """A client's raw embedding, checked for dimension and finiteness, L2-normalised."""
    assert item.embedding is not None
    vec = np.asarray(item.embedding, dtype=np.float32)
    if vec.shape != (dim,):
        raise unprocessable(
            "wrong_dimension", f"{where}.embedding has {vec.size} values, the encoder's is {dim}"
        )
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise unprocessable("bad_embedding", f"{where}.embedding must be finite and non-zero")
    return vec / norm


async def embed_items(
    items: Sequence[InputItem], embed_one: EmbedOne, dim: int, field: str = "inputs"
) -> list[np.ndarray]:
    """Each item's unit-norm embedding, in order (media through the encoder batchers).

    Every item is decoded and checked before any is encoded, so a bad third input fails the
    request at once; the encodings of a mix then run concurrently.
    """
    decoded: list[np.ndarray | tuple[Modality, Any, str]] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if item.embedding is not None:
            decoded.append(raw_embedding(item, where, dim))
        else:
            decoded.append((*decode_item(item, where), where))
    tasks = [asyncio.ensure_future(embed_one(*d)) for d in decoded if not isinstance(d, np.ndarray)]
    try:
        done = iter(await asyncio.gather(*tasks))
    except BaseException:
        # One input failed (or the request was cancelled): the others' decodes are wasted
        # work in the pool, stop them too.
        for task in tasks:
            task.cancel()
        raise
    return [d if isinstance(d, np.ndarray) else next(done) for d in decoded]


async def query_embedding(
    items: Sequence[InputItem], embed_one: EmbedOne, dim: int, field: str = "inputs"
) -> np.ndarray:
    """F_M [d] for one input or the weighted mix of several."""
    return (await embed_query(items, embed_one, dim, field)).f_m


@dataclass(frozen=True)
class QueryParts:
    """F_M of a query and what it is made of: each input's modality label and unit F_i.

    ``label`` is the input's modality, or None for a raw embedding sent without one (its kind
    is unknown: the query log skips it and its recall is reported as unverified); ``raw`` says
    which F_i a client sent rather than this service encoded.
    """

    f_m: np.ndarray
    labels: list[str | None]
    vectors: list[np.ndarray]
    raw: list[bool]

    @property
    def parts(self) -> list[tuple[str | None, np.ndarray, bool]]:
        return list(zip(self.labels, self.vectors, self.raw, strict=True))


async def embed_query(
    items: Sequence[InputItem], embed_one: EmbedOne, dim: int, field: str = "inputs"
) -> QueryParts:
    """F_M [d] for one input or the weighted mix of several, with its parts."""
    from cachebind.cache import mix

    if not items:
        raise unprocessable("empty_mix", f"{field} must hold at least one input")
    vectors = await embed_items(items, embed_one, dim, field)
    f_m = mix(vectors, [item.weight for item in items]).astype(np.float32)
    labels = [item.modality.value if item.modality is not None else None for item in items]
    raw = [item.embedding is not None for item in items]
    return QueryParts(f_m, labels, [np.asarray(v, dtype=np.float32) for v in vectors], raw)
