"""The FastAPI app: ``create_app(settings, runtime)``.

Handlers here only translate HTTP to the runtime and back. Model loading lives in
``runtime.py``, per-app state and batchers in ``state.py``, storage access in ``search.py``,
request models in ``schemas.py``, keys in ``auth.py``, the size guard and error handlers in
``middleware.py``, server-sent events in ``streaming.py`` and the metrics in ``metrics.py``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import pathlib
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from cachebind.config import Settings
from cachebind.errors import IndexMismatchError
from cachebind.modalities import Modality
from cachebind.serve import schemas as s
from cachebind.serve.auth import KeyStore, Role, presented_key
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.filters import FilterError, parse_filter
from cachebind.serve.inputs import embed_items, query_embedding
from cachebind.serve.middleware import GuardMiddleware, install_error_handlers
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.serve.search import search as run_search
from cachebind.serve.state import ServeState
from cachebind.serve.streaming import sse, stream_in_thread

log = logging.getLogger("cachebind.serve")
STATIC_DIR = pathlib.Path(__file__).parent / "static"
INT64_MAX = 2**63 - 1  # row ids are int64 (cachebind.store.row_id)
T = TypeVar("T")


def create_app(
    settings: Settings, runtime: Runtime | None = None, *, keys: KeyStore | None = None
) -> FastAPI:
    """The HTTP service over ``runtime`` (loaded from ``settings`` in the background if None).

    ``keys`` overrides the key files of ``settings.serve`` (an in-process client uses this).
    """
    state = ServeState(settings, runtime, keys)
    config = settings.serve

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.runtime is None:
            state.tasks.append(asyncio.create_task(state.load_runtime()))
        else:
            snap = state.runtime.snapshot
            state.metrics.set_index_version(snap.version if snap else None)
        if config.index_poll_s > 0:
            state.tasks.append(asyncio.create_task(state.poll_forever()))
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="cachebind",
        version="1",
        summary="ImageBind feature-cache service: embed, search, enhance, generate.",
        lifespan=lifespan,
    )
    app.state.serve = state
    app.add_middleware(GuardMiddleware, state=state)
    install_error_handlers(app)

    async def timed(awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, config.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                504, "timeout", f"the request took longer than {config.request_timeout_s} s"
            ) from None

    # ---------------------------------------------------------------- auth

    def role_of(request: Request) -> Role:
        if not config.auth:
            return Role.ADMIN
        assert state.keys is not None
        key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if key is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        role = state.keys.role(key)
        if role is Role.NONE:
            raise ApiError(
                401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        return role

    # async: FastAPI would run a plain function in its thread pool, one more hop per request.
    async def require_user(request: Request) -> Role:
        return role_of(request)

    async def require_admin(request: Request) -> Role:
        role = role_of(request)
        if role < Role.ADMIN:
            raise ApiError(403, "forbidden", "this route needs an admin key")
        return role

    # Every route that needs a key. Its error responses are documented so that generated
    # clients know the one error shape; this also replaces FastAPI's default 422 schema,
    # which is not what the handlers send.
    api = APIRouter(dependencies=[Depends(require_user)], responses=s.COMMON_ERRORS)

    def check_k(k: int, name: str = "k") -> None:
        if k > config.max_k:
            raise unprocessable("k_out_of_range", f"{name}={k} is above the limit {config.max_k}")

    # ---------------------------------------------------------------- health

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no auth)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={503: {"description": "not ready yet: the same body with ready false"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: the encoder and an index are loaded (no auth, so that load balancers and
        orchestrators can probe it; the load error, which may name server paths, is shown only
        to callers with a key)."""
        runtime = state.runtime
        snap = runtime.snapshot if runtime else None
        body = {
            "ready": bool(runtime and snap),
            "encoder": runtime is not None,
            "index_version": snap.version if snap else None,
            "generator": bool(runtime and runtime.generator is not None),
        }
        key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if key is not None and state.keys.role(key) is not Role.NONE:
            body["error"] = state.load_error
        return JSONResponse(body, 200 if body["ready"] else 503)

    @api.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,  # no JSON 200 in the docs; errors stay JSON
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # ---------------------------------------------------------------- embed

    embed_body = {
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

    @api.post(
        "/v1/embed",
        response_model=s.EmbedResponse,
        openapi_extra=embed_body,
        tags=["v1"],
    )
    async def embed(request: Request) -> s.EmbedResponse:
        """F_M of each input (no mixing): JSON ``{"inputs": [...]}`` or a multipart upload
        (``modality`` + one or more ``file`` parts, and/or ``text`` fields)."""
        runtime = state.require_runtime()
        items = await _embed_items_of(request)
        vectors = await timed(embed_items(items, state.embed_one, runtime.dim))
        return s.EmbedResponse(
            dim=runtime.dim,
            encoder=runtime.encoder_identity,
            items=[
                s.Embedding(modality=_modality_name(item), embedding=v.tolist())
                for item, v in zip(items, vectors, strict=True)
            ],
        )

    # ---------------------------------------------------------------- search

    @api.post("/v1/search", response_model=s.SearchResponse, tags=["v1"])
    async def search(body: s.SearchRequest) -> s.SearchResponse:
        """Nearest cached rows to the query (any modality, a raw embedding, or a mix)."""
        check_k(body.k)
        offset = _decode_cursor(body.cursor) if body.cursor else body.offset
        if offset + body.k > config.max_k:
            raise unprocessable(
                "k_out_of_range",
                f"offset + k = {offset + body.k} is above the limit {config.max_k}",
            )
        try:
            where = parse_filter(body.filter) if body.filter is not None else None
        except FilterError as exc:
            raise unprocessable("bad_filter", str(exc)) from exc
        runtime, snap = state.require_snapshot()

        async def work() -> s.SearchResponse:
            f_m = await query_embedding(body.inputs, state.embed_one, runtime.dim)

            async def search_fn(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
                return await state.index_batcher.submit((snap, q, n))

            page = await run_search(
                snap,
                f_m,
                need=offset + body.k,
                search_fn=search_fn,
                run=asyncio.to_thread,
                where=where,
                dedup=body.dedup,
            )
            hits = page.hits[offset:]
            more = not page.exhausted and len(page.hits) == offset + body.k
            next_offset = offset + len(hits) if more else None
            return s.SearchResponse(
                results=[
                    s.SearchHit(
                        id=h.id,
                        score=h.score,
                        key=h.row.get("key"),
                        caption=h.row.get("caption"),
                        url=h.row.get("url"),
                        width=h.row.get("width"),
                        height=h.row.get("height"),
                        image_url=f"/v1/images/{h.id}",
                    )
                    for h in hits
                ],
                offset=offset,
                next_offset=next_offset,
                next_cursor=_encode_cursor(next_offset) if next_offset is not None else None,
                index_version=snap.version,
                exhausted=not more,
            )

        return await timed(work())

    @api.get(
        "/v1/images/{row_id}",
        tags=["v1"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}} | s.ROW_ERRORS,
    )
    async def image(row_id: Annotated[int, Path(ge=0, le=INT64_MAX)]) -> Response:
        """The thumbnail JPEG stored with a row (404 when the row or its thumbnail is absent)."""
        _, snap = state.require_snapshot()
        if "thumbnail" not in snap.table.dataset.schema.names:
            raise ApiError(404, "not_found", "this cache stores no thumbnails")
        rows = await asyncio.to_thread(snap.table.rows, [row_id], ["id", "thumbnail"])
        data = rows.column("thumbnail")[0].as_py() if rows.num_rows else None
        if not data:
            raise ApiError(404, "not_found", f"no thumbnail for id {row_id}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})

    # ---------------------------------------------------------------- enhance

    async def enhanced_of(
        items: list[s.InputItem], k: int | None, t: float | None, alpha: float | None
    ) -> tuple[Runtime, IndexSnapshot, np.ndarray, Any, tuple[int, float, float]]:
        cache = runtime_cache_defaults()
        k = cache.k if k is None else k
        t = cache.t if t is None else t
        alpha = cache.alpha if alpha is None else alpha
        check_k(k)
        runtime, snap = state.require_snapshot()
        f_m = await query_embedding(items, state.embed_one, runtime.dim)
        enhanced = await state.enhance_batcher.submit((snap, f_m, k, t, alpha))
        return runtime, snap, f_m, enhanced, (k, t, alpha)

    def runtime_cache_defaults() -> Any:
        return state.runtime.cache_config if state.runtime else settings.cache

    async def neighbours_of(snap: IndexSnapshot, enhanced: Any) -> list[s.Neighbour]:
        ids = [int(i) for i in enhanced.ids]
        rows = await asyncio.to_thread(snap.table.rows, ids, ["id", "key", "caption"])
        meta = {r["id"]: r for r in rows.to_pylist()}
        return [
            s.Neighbour(
                id=i,
                similarity=float(sim),
                weight=float(w),
                key=meta.get(i, {}).get("key"),
                caption=meta.get(i, {}).get("caption"),
            )
            for i, sim, w in zip(ids, enhanced.similarities, enhanced.weights, strict=True)
        ]

    @api.post("/v1/enhance", response_model=s.EnhanceResponse, tags=["v1"])
    async def enhance(body: s.EnhanceRequest) -> s.EnhanceResponse:
        """F~_M = normalize((1 - alpha) F_M + alpha normalize(softmax(t S_topk) F_value))."""

        async def work() -> s.EnhanceResponse:
            _, snap, f_m, enhanced, (k, t, alpha) = await enhanced_of(
                body.inputs, body.k, body.t, body.alpha
            )
            tilde = np.asarray(enhanced.embedding, dtype=np.float32)
            cosine = float(f_m @ tilde / max(np.linalg.norm(f_m) * np.linalg.norm(tilde), 1e-12))
            return s.EnhanceResponse(
                query_embedding=f_m.tolist(),
                embedding=tilde.tolist(),
                cosine_to_query=cosine,
                neighbours=await neighbours_of(snap, enhanced),
                k=k,
                t=t,
                alpha=alpha,
                index_version=snap.version,
            )

        return await timed(work())

    # ---------------------------------------------------------------- generate

    @api.post(
        "/v1/generate",
        tags=["v1"],
        response_model=s.GenerateResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def generate(body: s.GenerateRequest, request: Request) -> Any:
        """Text from LLaMA with the cache-enhanced visual feature F~_M injected.

        ``stream: true`` (default) answers ``text/event-stream``: ``data: {"text": piece}``
        events, then ``event: done`` with the whole text (or ``event: error``).
        """
        runtime = state.require_runtime()
        if runtime.generator is None:
            raise ApiError(503, "no_llm", "this server has no LLM configured (llm.llama_dir)")

        async def prepare() -> tuple[np.ndarray | None, list[s.Neighbour]]:
            if not body.inputs:
                return None, []  # text only: plain LLaMA, the adapter's visual query is off
            _, snap, _, enhanced, _ = await enhanced_of(body.inputs, body.k, body.t, body.alpha)
            visual = np.asarray(enhanced.embedding, dtype=np.float32)[None, :]
            return visual, await neighbours_of(snap, enhanced)

        visual, neighbours = await timed(prepare())
        options = {
            "max_new_tokens": body.max_new_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
        }
        pieces = stream_in_thread(runtime, body.prompt, visual, options, state.generate_executor)
        if not body.stream:
            text = "".join([p async for p in pieces])
            return s.GenerateResponse(text=text, neighbours=neighbours)

        async def events() -> AsyncIterator[str]:
            neighbours_json = [n.model_dump() for n in neighbours]
            yield sse({"neighbours": neighbours_json}, event="neighbours")
            text = []
            try:
                async for piece in pieces:
                    text.append(piece)
                    yield sse({"text": piece})
            except Exception as exc:
                log.exception("generation failed")
                yield sse({"error": "generation_failed", "detail": type(exc).__name__}, "error")
                return
            yield sse({"text": "".join(text)}, event="done")

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---------------------------------------------------------------- index + admin

    @api.get("/v1/index", response_model=s.IndexInfo, tags=["v1"])
    async def index_info() -> s.IndexInfo:
        """The index version being served and its manifest."""
        runtime = state.require_runtime()
        snap = runtime.snapshot
        if snap is None:
            return s.IndexInfo(version=None, manifest=None, table_version=None, rows=None, dim=None)
        rows = snap.rows
        return s.IndexInfo(
            version=snap.version,
            manifest=json.loads(json.dumps(snap.manifest, default=str)),
            table_version=int(snap.table.version),
            rows=rows,
            dim=int(snap.table.dim),
        )

    @app.post(
        "/v1/admin/reload",
        response_model=s.ReloadResponse,
        dependencies=[Depends(require_admin)],
        tags=["admin"],
        responses=s.COMMON_ERRORS | s.ADMIN_ERRORS,
    )
    async def admin_reload(force: bool = False) -> s.ReloadResponse:
        """Load the published index version now (``force`` reloads even the same version),
        and re-read the key files."""
        if state.keys_from_files:
            try:
                state.keys = await asyncio.to_thread(state.read_keys)
            except (OSError, ValueError) as exc:  # keep the keys in force
                raise ApiError(409, "bad_key_file", str(exc)) from exc
        try:
            swapped = await state.reload(force=force)
        except IndexMismatchError as exc:
            raise ApiError(409, "index_mismatch", str(exc)) from exc
        except FileNotFoundError as exc:
            raise ApiError(409, "index_unavailable", str(exc)) from exc
        snap = state.runtime.snapshot if state.runtime else None
        return s.ReloadResponse(
            reloaded=swapped,
            version=snap.version if snap else None,
            detail="" if swapped else "already serving the published version",
        )

    app.include_router(api)
    _document_embed_request(app)

    # ---------------------------------------------------------------- web page

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ---------------------------------------------------------------- helpers

    async def _embed_items_of(request: Request) -> list[s.InputItem]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await _multipart_items(request)
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise unprocessable("bad_json", f"the body is not JSON: {exc}") from exc
        try:
            return s.EmbedRequest.model_validate(payload).inputs
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc

    async def _multipart_items(request: Request) -> list[s.InputItem]:
        form = await request.form(max_files=config.max_batch, max_fields=config.max_batch + 1)
        try:
            texts = [v for v in form.getlist("text") if isinstance(v, str)]
            files = [f for f in form.getlist("file") if not isinstance(f, str)]
            modality = form.get("modality")
            if files and not isinstance(modality, str):
                raise unprocessable("missing_modality", "a 'modality' field must go with 'file'")
            items = [s.InputItem(modality=Modality.TEXT, text=t) for t in texts]
            for f in files:
                data = await f.read()
                items.append(
                    s.InputItem(modality=modality, data=base64.b64encode(data).decode("ascii"))
                )
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        finally:
            await form.close()
        if not items:
            raise unprocessable("empty_input", "send at least one 'file' or 'text' part")
        return items

    return app


# --------------------------------------------------------------------------- helpers


def _modality_name(item: s.InputItem) -> str:
    return item.modality.value if item.modality is not None else "embedding"


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        offset = json.loads(raw)["offset"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(offset)
        return offset
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise unprocessable("bad_cursor", "cursor is not one this service returned") from exc


def _document_embed_request(app: FastAPI) -> None:
    """Put ``EmbedRequest`` into the OpenAPI components.

    /v1/embed reads its body by hand (JSON or multipart), so FastAPI never sees the model and
    the route's ``$ref`` to it would dangle.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            body = s.EmbedRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["EmbedRequest"] = body
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
