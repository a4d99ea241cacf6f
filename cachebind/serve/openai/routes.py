"""The OpenAI-compatible handlers. They reach the encoder, the cache blend and the generator
through the same service functions as the native routes (``serve.blend``,
``serve.generation``, ``serve.inputs``), behind the same keys, limits, sandbox and metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cachebind.inject.llava_serve import PromptImages
from cachebind.modalities import Modality
from cachebind.serve.blend import VisualPrompt, enhanced_of, neighbours_of, visual_prompt
from cachebind.serve.deps import Limits, RequestLimits, State
from cachebind.serve.generation import (
    collect,
    finish_reason_of,
    require_generator,
    start_generation,
    until_disconnected,
    usage_of,
)
from cachebind.serve.inputs import embed_items, embed_query
from cachebind.serve.llava import ImageSource, llava_of, prompt_images, refuse_blend
from cachebind.serve.openai import schemas as o
from cachebind.serve.openai.errors import invalid
from cachebind.serve.openai.media import MediaRef, cached_row, input_of, message_media
from cachebind.serve.openai.render import render_chat, render_llava_chat, text_of
from cachebind.serve.schemas import InputItem
from cachebind.serve.services.generate import GenerationRequest
from cachebind.serve.state import ServeState
from cachebind.serve.streaming import ScheduledStream

log = logging.getLogger("cachebind.serve")

router = APIRouter(tags=["openai"])

MAX_STOPS = 16
STARTED = int(time.time())  # the ``created`` of the served models: when this process started


# ---------------------------------------------------------------- checks shared by the routes


def refuse_unsupported(body: o.Lenient) -> None:
    """A 400 naming every OpenAI option this server would otherwise have to ignore."""
    refused = o.unsupported(body.model_extra)
    if refused:
        raise invalid(
            "unsupported_parameter",
            "this server does not support: " + ", ".join(refused),
            refused[0].split("=", 1)[0],
        )


def check_model(model: str, served: str, what: str) -> None:
    if model != served:
        raise invalid(
            "model_not_found",
            f"the model {model!r} is not served here; the {what} is {served!r} (GET /v1/models)",
            "model",
            status=404,
        )


def check_text(limits: Limits, text: str, field: str) -> None:
    size = len(text.encode("utf-8"))
    if size > limits.config.max_text_bytes:
        raise invalid(
            "text_too_large",
            f"the text of {field} is {size} bytes; the limit is {limits.config.max_text_bytes}",
            field,
        )


def counted_media(limits: Limits, messages: list[o.Message]) -> list[MediaRef]:
    """The conversation's media references, refused before any is read when over the limit."""
    refs = message_media(messages)
    if len(refs) > limits.config.max_inputs:
        raise invalid(
            "too_many_inputs",
            f"the messages hold {len(refs)} media; the limit is {limits.config.max_inputs}",
            "messages",
        )
    return refs


async def media_inputs(
    state: ServeState, limits: Limits, messages: list[o.Message]
) -> list[InputItem]:
    """The media of a conversation as query inputs, counted before any is read."""
    refs = counted_media(limits, messages)
    config, budget = state.config.openai, state.settings.input
    return list(await asyncio.gather(*(input_of(r, config, budget) for r in refs)))


async def image_sources(
    state: ServeState, limits: Limits, messages: list[o.Message]
) -> list[ImageSource]:
    """llava mode: the conversation's images in order, a ``cachebind://rows/<id>`` URL
    naming a cached row (its stored patch tokens), any other read as ``media_inputs`` reads it."""
    refs = counted_media(limits, messages)
    config, budget = state.config.openai, state.settings.input

    async def source(ref: MediaRef) -> ImageSource:
        row = cached_row(ref)
        return row if row is not None else await input_of(ref, config, budget)

    return list(await asyncio.gather(*(source(r) for r in refs)))


def cache_info(prompt: VisualPrompt) -> dict[str, Any]:
    """The ``cachebind`` extension of an answer: the blend used and its neighbours."""
    q = prompt.query
    return {
        "blend": q is not None,
        "k": q.k if q else None,
        "t": q.t if q else None,
        "alpha": q.alpha if q else None,
        "index_version": q.snap.version if q else None,
        "neighbours": [n.model_dump(mode="json") for n in prompt.neighbours],
    }


def stop_strings(body: o.Sampling) -> tuple[str, ...]:
    """``body``'s stop strings, refused past ``MAX_STOPS`` (before any media is decoded)."""
    stops = body.stops()
    if len(stops) > MAX_STOPS:
        raise invalid("too_many_stops", f"stop holds {len(stops)}; at most {MAX_STOPS}", "stop")
    return tuple(stops)


def generation_request(
    body: o.Sampling,
    prompt: str,
    visual: np.ndarray | None,
    *,
    max_tokens: int | None,
    stops: tuple[str, ...],
    template: bool,
    images: PromptImages | None = None,
) -> GenerationRequest:
    """The generation ``body`` asks for."""
    return GenerationRequest(
        prompt,
        visual,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stops,
        template=template,
        images=images,
    )


# ---------------------------------------------------------------- /v1/models


def llm_kind(runtime: Any) -> dict[str, str]:
    """What the served LLM is: the adapter's release, or the tokens-mode model (LLaVA-1.5,
    SPHINX's mixed embedding)."""
    if runtime.llm_mode == "llava":
        return {"model": str(getattr(runtime.generator, "model_name", "llava-1.5"))}
    return {"adapter": "imagebind-llm"}


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    """The served models: the LLM with its adapter (chat, completions) and the encoder
    (embeddings)."""
    runtime = state.require_runtime()
    config = state.config.openai
    created = STARTED
    data = [
        {
            "id": config.embedding_model,
            "object": "model",
            "created": created,
            "owned_by": "cachebind",
            "cachebind": {"kind": "encoder", "dim": runtime.dim, **runtime.encoder_identity},
        }
    ]
    if runtime.generator is not None:
        data.insert(
            0,
            {
                "id": config.llm_model,
                "object": "model",
                "created": created,
                "owned_by": "cachebind",
                "cachebind": {"kind": "llm", "mode": runtime.llm_mode, **llm_kind(runtime)},
            },
        )
    return {"object": "list", "data": data}


# ---------------------------------------------------------------- /v1/chat/completions


@router.post("/v1/chat/completions")
async def chat_completions(
    body: o.ChatRequest, state: State, limits: RequestLimits, request: Request
) -> Any:
    """A reply of the LLM to a conversation whose media (data URLs, inline audio) go through
    the encoder and the cache blend into the adapter, as ``/v1/generate``."""
    refuse_unsupported(body)
    require_generator(state)
    check_model(body.model, state.config.openai.llm_model, "chat model")
    llava = llava_of(state)
    prompt = render_llava_chat(body.messages) if llava else render_chat(body.messages)
    check_text(limits, prompt, "messages")
    stops = stop_strings(body)
    cache = body.cachebind
    images = None
    if llava is not None:  # each image's visual tokens where its <image> stands
        refuse_blend(k=cache.k, t=cache.t, alpha=cache.alpha)
        sources = await limits.timed(image_sources(state, limits, body.messages))
        images = await limits.timed(prompt_images(state, limits, llava, sources, "media"))
        visual = VisualPrompt()
    else:
        items = await limits.timed(media_inputs(state, limits, body.messages))
        blend = visual_prompt(
            state, limits, items, cache.k, cache.t, cache.alpha, blend=cache.blend, field="media"
        )
        visual = await limits.timed(blend)
    # The conversation is already rendered in its template.
    generation = generation_request(
        body,
        prompt,
        visual.visual,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stops=stops,
        template=False,
        images=images,
    )
    scheduled = start_generation(state, generation)
    answer = Answer("chat.completion", body.model, cache_info(visual))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return answer.stream(scheduled, include_usage)
    text = await until_disconnected(request, collect(scheduled.pieces))
    if text is None:  # the client left: its slot is already free
        return Response(status_code=499)
    return answer.whole(text, scheduled)


# ---------------------------------------------------------------- /v1/completions


@router.post("/v1/completions")
async def completions(
    body: o.CompletionRequest, state: State, limits: RequestLimits, request: Request
) -> Any:
    """A continuation of a plain prompt by the LLM (no visual feature); ``cachebind.template``
    wraps it in the release's Alpaca template first."""
    refuse_unsupported(body)
    require_generator(state)
    check_model(body.model, state.config.openai.llm_model, "completion model")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise invalid(
            "unsupported_parameter", "prompt must be one string (no batches of prompts)", "prompt"
        )
    if not prompts[0]:
        raise invalid("empty_input", "prompt is empty", "prompt")
    check_text(limits, prompts[0], "prompt")
    generation = generation_request(
        body,
        prompts[0],
        None,
        max_tokens=body.max_tokens,
        stops=stop_strings(body),
        template=body.cachebind.template,
    )
    scheduled = start_generation(state, generation)
    answer = Answer("text_completion", body.model, cache_info(VisualPrompt()))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return answer.stream(scheduled, include_usage)
    text = await until_disconnected(request, collect(scheduled.pieces))
    if text is None:
        return Response(status_code=499)
    return answer.whole(text, scheduled)


class Answer:
    """A generation answered in OpenAI's chat (``chat.completion``) or completion
    (``text_completion``) objects, whole or as chunks."""

    def __init__(self, kind: str, model: str, extension: dict[str, Any]) -> None:
        self.kind = kind
        self.chat = kind == "chat.completion"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        self.extension = extension

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = f"{self.kind}.chunk" if chunk and self.chat else self.kind
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if not self.chat:
            choice["text"] = text or ""
        elif chunk:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def whole(self, text: str, scheduled: ScheduledStream) -> dict[str, Any]:
        body = self._envelope([self._choice(text, finish_reason_of(scheduled), False)], False)
        return body | {"usage": usage_of(scheduled).as_dict(), "cachebind": self.extension}

    def stream(self, scheduled: ScheduledStream, include_usage: bool) -> StreamingResponse:
        pieces = scheduled.pieces

        async def chunks() -> AsyncIterator[str]:
            try:
                first = self._choice(None if self.chat else "", None, True)
                if self.chat:
                    first["delta"] = {"role": "assistant", "content": ""}
                yield _data(self._envelope([first], True) | {"cachebind": self.extension})
                try:
                    async for piece in pieces:
                        yield _data(self._envelope([self._choice(piece, None, True)], True))
                except Exception as exc:
                    log.exception("generation failed")
                    error = {"message": type(exc).__name__, "type": "server_error"}
                    yield _data({"error": error | {"param": None, "code": "generation_failed"}})
                    yield "data: [DONE]\n\n"
                    return
                last = self._choice(None, finish_reason_of(scheduled), True)
                yield _data(self._envelope([last], True))
                if include_usage:
                    usage = usage_of(scheduled).as_dict()
                    yield _data(self._envelope([], True) | {"usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                await pieces.aclose()
                scheduled.cancel()

        stream = chunks()
        # A stream cancelled before its first chunk never runs its finally: free the slot.
        weakref.finalize(stream, scheduled.cancel)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ---------------------------------------------------------------- /v1/embeddings


@router.post("/v1/embeddings")
async def embeddings(body: o.EmbeddingRequest, state: State, limits: RequestLimits) -> Any:
    """Text embeddings of ``input`` (one per string), or one embedding of a chat-style
    ``messages`` (its texts and media mixed, as vLLM's multimodal form). With
    ``cachebind.enhanced`` each is the cache-enhanced F~_M, with its neighbours."""
    refuse_unsupported(body)
    runtime = state.require_runtime()
    check_model(body.model, state.config.openai.embedding_model, "embedding model")
    if (body.input is None) == (body.messages is None):
        raise invalid("invalid_input", "give exactly one of input or messages", "input")
    if body.dimensions is not None and body.dimensions != runtime.dim:
        raise invalid(
            "unsupported_parameter",
            f"dimensions={body.dimensions}: this encoder's embeddings have {runtime.dim}",
            "dimensions",
        )
    if body.input is not None:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise invalid("empty_input", "input is an empty list", "input")
        groups = [[InputItem(modality=Modality.TEXT, text=t)] for t in texts]
        limits.check_inputs([g[0] for g in groups], "input")
    else:
        assert body.messages is not None
        texts = [t for t in (text_of(m) for m in body.messages) if t.strip()]
        media = await limits.timed(media_inputs(state, limits, body.messages))
        group = [InputItem(modality=Modality.TEXT, text=t) for t in texts] + media
        if not group:
            raise invalid("empty_input", "the messages hold no text and no media", "messages")
        limits.check_inputs(group, "messages")
        groups = [group]

    async def work() -> list[tuple[np.ndarray, dict[str, Any] | None]]:
        cache = body.cachebind
        if cache.enhanced:
            out: list[tuple[np.ndarray, dict[str, Any] | None]] = []
            for group in groups:
                q = await enhanced_of(state, limits, group, cache.k, cache.t, cache.alpha, "input")
                info = cache_info(VisualPrompt(None, await neighbours_of(q.snap, q.enhanced), q))
                out.append((np.asarray(q.enhanced.embedding, dtype=np.float32), info))
            return out
        if body.input is not None:
            items = [g[0] for g in groups]
            return [(v, None) for v in await embed_items(items, state.embed_one, runtime.dim)]
        f_m = (await embed_query(groups[0], state.embed_one, runtime.dim, "messages")).f_m
        return [(f_m / max(float(np.linalg.norm(f_m)), 1e-12), None)]

    results = await limits.timed(work())
    data = []
    for i, (vector, info) in enumerate(results):
        item: dict[str, Any] = {
            "object": "embedding",
            "index": i,
            "embedding": encoded(vector, body.encoding_format),
        }
        if info is not None:
            item["cachebind"] = info
        data.append(item)
    tokens = await asyncio.to_thread(text_tokens, texts)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a list of numbers; base64: the little-endian float32 bytes, as OpenAI sends."""
    v = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v.tolist()


def text_tokens(texts: list[str]) -> int:
    """Tokens the text encoder reads: CLIP's BPE with start and end, cut at its context."""
    from cachebind.preprocess.text import default_tokenizer

    tokenizer = default_tokenizer()
    return sum(min(len(tokenizer.encode(t)) + 2, tokenizer.context_length) for t in texts)
