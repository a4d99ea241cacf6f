"""Row ids in JSON: strings by default, numbers where the client asks (``?ids=number``).

Row ids are 64-bit hashes: a JavaScript client parses a number past 2^53 to a different id
(3016896583596085263 becomes ...248), so JSON carries them as decimal strings unless a
client that parses 64-bit integers asks for numbers.
"""

from __future__ import annotations

import contextvars
from typing import Annotated, Literal

from fastapi import Query
from pydantic import PlainSerializer

_AS_NUMBERS: contextvars.ContextVar[bool] = contextvars.ContextVar("ids_as_numbers", default=False)


def _serialize(value: int) -> int | str:
    return value if _AS_NUMBERS.get() else str(value)


RowId = Annotated[int, PlainSerializer(_serialize, return_type=int | str, when_used="json")]
"""A row id: an int in Python, a string (or, on request, a number) in JSON."""


async def id_format(
    ids: Literal["string", "number"] = Query(
        "string",
        description="How row ids are written in the JSON answer: 'string' (exact in every "
        "language) or 'number' (a 64-bit integer; JavaScript rounds past 2^53).",
    ),
) -> None:
    """Route dependency: the id format of this request's answer (its own context)."""
    _AS_NUMBERS.set(ids == "number")
