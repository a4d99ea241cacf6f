"""``POST /v1/embed``: F_M of each input, from a JSON body or a multipart upload."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from cachebind.config import ServeConfig
from cachebind.modalities import Modality
from cachebind.serve import schemas as s
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import unprocessable
from cachebind.serve.inputs import embed_items

router = APIRouter()

# The body is read by hand (JSON or multipart), so FastAPI cannot derive it from a parameter;
# ``create_app`` puts ``EmbedRequest`` itself into the components.
EMBED_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "modality": {"type": "string", "enum": [m.value for m in Modality]},
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                        "text": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
        },
    }
}


@router.post(
    "/v1/embed",
    response_model=s.EmbedResponse,
    openapi_extra=EMBED_BODY,
    tags=["v1"],
)
async def embed(request: Request, state: State, limits: RequestLimits) -> s.EmbedResponse:
    """F_M of each input (no mixing): JSON ``{"inputs": [...]}`` or a multipart upload
    (``modality`` + one or more ``file`` parts, and/or ``text`` fields)."""
    runtime = state.require_runtime()
    items = await embed_items_of(request, state.config)
    limits.check_inputs(items)
    vectors = await limits.timed(embed_items(items, state.embed_one, runtime.dim))
    return s.EmbedResponse(
        dim=runtime.dim,
        encoder=runtime.encoder_identity,
        items=[
            s.Embedding(modality=_modality_name(item), embedding=v.tolist())
            for item, v in zip(items, vectors, strict=True)
        ],
    )


async def embed_items_of(request: Request, config: ServeConfig) -> list[s.InputItem]:
    """The inputs of a JSON or multipart body (422 with the one error shape when malformed)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _multipart_items(request, config)
    # Parsed and validated in a worker thread: megabytes of JSON would hold the event loop.
    body = await request.body()
    try:
        return await asyncio.to_thread(_json_items, body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    except RecursionError as exc:
        raise unprocessable("bad_json", "the body is JSON nested too deeply") from exc
    except ValueError as exc:
        # Not only JSONDecodeError and UnicodeDecodeError: an integer of more than 4,300 digits
        # is refused by the parser with a plain ValueError.
        raise unprocessable("bad_json", f"the body is not JSON: {exc}") from exc


def _json_items(body: bytes) -> list[s.InputItem]:
    return s.EmbedRequest.model_validate(json.loads(body)).inputs


async def _multipart_items(request: Request, config: ServeConfig) -> list[s.InputItem]:
    form = await request.form(max_files=config.max_inputs, max_fields=config.max_inputs + 1)
    try:
        texts = [v for v in form.getlist("text") if isinstance(v, str)]
        files = [f for f in form.getlist("file") if not isinstance(f, str)]
        modality = form.get("modality")
        if files and not isinstance(modality, str):
            raise unprocessable("missing_modality", "a 'modality' field must go with 'file'")
        items = [s.InputItem(modality=Modality.TEXT, text=t) for t in texts]
        for f in files:
            data = await f.read()
            encoded = base64.b64encode(data).decode("ascii")
            items.append(s.InputItem.model_validate({"modality": modality, "data": encoded}))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    finally:
        await form.close()
    if not items:
        raise unprocessable("empty_input", "send at least one 'file' or 'text' part")
    return items


def _modality_name(item: s.InputItem) -> str:
    return item.modality.value if item.modality is not None else "embedding"
