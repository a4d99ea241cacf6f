"""Multipart uploads on every route that takes media (besides ``/v1/embed``, which reads its
own): the form becomes the route's JSON body before the app parses it.

The form: ``file`` parts (repeatable) with one ``modality`` field for them, ``text`` fields
(repeatable) for text inputs, and any other field of the route's JSON body by name (``k``,
``filter``, ``prompt``, ``stream`` ...), as text. Each file or text is one input, of weight 1
unless weighted: the n-th ``file_weight`` field weighs the n-th ``file`` part and the n-th
``text_weight`` field the n-th ``text`` field. Weights pair by name and order, not by position
among other fields, because clients (``requests``, ``httpx``) send all text fields before the
files; a form gives a weight to every input of a kind or to none.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

from cachebind.config import ServeConfig

FORM_PATHS = frozenset({"/v1/search", "/v1/enhance", "/v1/generate"})
BOOLEANS = {"true": True, "false": False}
# The weight field of each kind of input part.
WEIGHTS = {"file": "file_weight", "text": "text_weight"}


def form_schema(extra: dict[str, Any]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that also takes this form; ``extra``: its other fields."""
    properties = {
        "modality": {"type": "string", "description": "The modality of the file parts."},
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "text": {"type": "array", "items": {"type": "string"}},
        "file_weight": {
            "type": "array",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "description": "The mix weight of each file part, in order (one per file, or none).",
        },
        "text_weight": {
            "type": "array",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "description": "The mix weight of each text field, in order (one per text, or none).",
        },
        **extra,
    }
    form = {"schema": {"type": "object", "properties": properties}}
    return {"requestBody": {"content": {"multipart/form-data": form}}}


async def form_to_json(request: Request, config: ServeConfig) -> bytes:
    """The JSON body a form stands for."""
    # Texts, their weights and the files' weights: at most two fields per input.
    form = await request.form(max_files=config.max_inputs, max_fields=2 * config.max_inputs + 32)
    try:
        body: dict[str, Any] = {}
        inputs: dict[str, list[dict[str, Any]]] = {"file": [], "text": []}
        order: list[dict[str, Any]] = []
        modality = form.get("modality")
        for name, value in form.multi_items():
            if name == "text" and isinstance(value, str):
                inputs["text"].append({"modality": "text", "text": value})
                order.append(inputs["text"][-1])
            elif name == "file" and not isinstance(value, str):
                data = base64.b64encode(await value.read()).decode("ascii")
                inputs["file"].append({"modality": modality, "data": data})
                order.append(inputs["file"][-1])
            elif name not in ("modality", "file", "text", *WEIGHTS.values()) and isinstance(
                value, str
            ):
                body[name] = BOOLEANS.get(value.lower(), value) if name == "stream" else value
        for kind, field in WEIGHTS.items():
            weigh(inputs[kind], form.getlist(field), kind, field)
        if order:
            body["inputs"] = order
        return json.dumps(body).encode()
    finally:
        await form.close()


def weigh(items: list[dict[str, Any]], weights: list[Any], kind: str, field: str) -> None:
    """Give the n-th item the n-th weight; raises ``ValueError`` naming a bad or missing one."""
    if not weights:
        return
    if len(weights) != len(items):
        raise ValueError(
            f"{len(weights)} {field} fields for {len(items)} {kind} part(s): give one per "
            f"{kind} part, in order, or none"
        )
    for n, (item, raw) in enumerate(zip(items, weights, strict=True)):
        weight = _number(raw)
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{field} #{n + 1} is {str(raw)[:40]!r}; a weight is a number > 0")
        item["weight"] = weight


def _number(raw: Any) -> float | None:
    if not isinstance(raw, str):  # a file sent under a weight's name
        return None
    try:
        return float(raw)
    except ValueError:
        return None


class MultipartForms:
    """ASGI: a multipart POST to one of ``FORM_PATHS`` continues as its JSON body (inside the
    guard, so the size and time limits have already applied to the upload)."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        content_type = headers.get(b"content-type", b"")
        if (
            scope["type"] != "http"
            or scope.get("path") not in FORM_PATHS
            or not content_type.startswith(b"multipart/form-data")
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await form_to_json(Request(scope, receive), self.config)
        except (HTTPException, MultiPartException, ValueError) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            refusal = JSONResponse(
                {"error": "bad_form", "detail": f"the multipart form is malformed: {detail}"},
                422,
            )
            await refusal(scope, receive, send)
            return
        replaced = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        replaced += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": replaced}, replay, send)
