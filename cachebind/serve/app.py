"""The FastAPI app: ``create_app(settings, runtime)``.

Handlers here only translate HTTP to the runtime and back. Model loading lives in
``runtime.py``, storage access in ``search.py``, request models in ``schemas.py``, keys in
``auth.py``, micro-batching in ``batching.py`` and the Prometheus metrics in ``metrics.py``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from cachebind.config import Settings
from cachebind.errors import IndexMismatchError, InputError
from cachebind.modalities import Modality
from cachebind.serve import schemas as s
from cachebind.serve.auth import KeyStore, Role, presented_key
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.errors import ApiError, unavailable, unprocessable
from cachebind.serve.filters import FilterError, parse_filter
from cachebind.serve.inputs import embed_items, query_embedding
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.serve.search import search as run_search

log = logging.getLogger("cachebind.serve")
STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")


class BodyTooLarge(Exception):
    """The request body went past ``ServeConfig.max_request_bytes`` while being read."""


# --------------------------------------------------------------------------- state


class ServeState:
    """Everything one app instance owns: runtime, keys, metrics, batchers, background tasks."""

    def __init__(self, settings: Settings, runtime: Runtime | None, keys: KeyStore | None) -> None:
        self.settings = settings
        self.config = settings.serve
        self.runtime = runtime
        self.load_error: str | None = None
        from_files = keys is None and self.config.auth
        if from_files:
            keys = self.read_keys()
        self.keys = keys
        # Key files are re-read on an admin reload (a new key needs no restart), unless the
        # caller handed keys in.
        self.keys_from_files = from_files
        self.metrics = Metrics()
        # One thread for the model: torch already uses every core inside one call, and a
        # single worker lets the batcher grow batches while the model is busy.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="cachebind-encoder")
        # Generations wait for each other here, not in the default pool that table reads use.
        self.generate_executor = ThreadPoolExecutor(1, thread_name_prefix="cachebind-llm")
        self.encoders: dict[Modality, MicroBatcher[Any, np.ndarray]] = {}
        self.index_batcher = MicroBatcher(
            self._search_batch,
            window_ms=self.config.batch_window_ms,
            max_batch=self.config.max_batch,
            max_inflight=2,
            on_batch=lambda n: self.metrics.batch_size.labels(batcher="index").observe(n),
            name="index",
        )
        self.enhance_batcher = MicroBatcher(
            self._enhance_batch,
            window_ms=self.config.batch_window_ms,
            max_batch=self.config.max_batch,
            max_inflight=2,
            on_batch=lambda n: self.metrics.batch_size.labels(batcher="enhance").observe(n),
            name="enhance",
        )
        self.reload_lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[Any]] = []

    def read_keys(self) -> KeyStore:
        keys = KeyStore.from_files(self.config.api_keys_file, self.config.admin_keys_file)
        if not keys.user and not keys.admin:
            raise ValueError(
                "serve.auth is on but no keys are configured: set serve.api_keys_file "
                "(lines 'sha256:<hex>', see cachebind.serve.auth.create_key) or --no-auth"
            )
        return keys

    # ---------------------------------------------------------------- runtime access

    def require_runtime(self) -> Runtime:
        if self.runtime is None:
            raise unavailable(
                f"the models failed to load: {self.load_error}"
                if self.load_error
                else "the models are still loading; retry shortly (see /readyz)"
            )
        return self.runtime

    def require_snapshot(self) -> tuple[Runtime, IndexSnapshot]:
        runtime = self.require_runtime()
        snapshot = runtime.snapshot  # taken once: the whole request uses this version
        if snapshot is None:
            raise unavailable("no index has been published yet (run `cachebind index`)")
        return runtime, snapshot

    # ---------------------------------------------------------------- batched work

    async def embed_one(self, modality: Modality, raw: Any, source: str) -> np.ndarray:
        """F_M of one raw input: preprocess here (its own InputError), encode micro-batched."""
        runtime = self.require_runtime()
        if modality is Modality.TEXT and len(raw) < 10_000:
            # Tokenising a short text costs less than a hop to a worker thread.
            tensor = runtime.preprocess(modality, raw, source)
        else:
            tensor = await asyncio.to_thread(runtime.preprocess, modality, raw, source)
        batcher = self.encoders.get(modality)
        if batcher is None:
            batcher = self.encoders[modality] = MicroBatcher(
                lambda tensors, m=modality: list(runtime.encode_batch(m, tensors)),
                window_ms=self.config.batch_window_ms,
                max_batch=self.config.max_batch,
                executor=self.model_executor,
                on_batch=lambda n, m=modality: self.metrics.batch_size.labels(
                    batcher=f"encoder:{m.value}"
                ).observe(n),
                name=f"encoder-{modality.value}",
            )
        return await batcher.submit(tensor)

    @staticmethod
    def _search_batch(
        items: list[tuple[IndexSnapshot, np.ndarray, int]],
    ) -> list[tuple[np.ndarray, np.ndarray] | ItemError]:
        # Queries of one batch may straddle an index swap: group them by snapshot.
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (snap, _, _) in enumerate(items):
            groups.setdefault(id(snap), []).append(i)
        for members in groups.values():
            snap = items[members[0]][0]
            k = max(items[i][2] for i in members)
            queries = np.stack([items[i][1] for i in members]).astype(np.float32)
            scores, ids = snap.index.search(queries, k)
            for row, i in enumerate(members):
                kk = items[i][2]
                out[i] = (np.asarray(scores[row, :kk]), np.asarray(ids[row, :kk]))
        return out

    @staticmethod
    def _enhance_batch(
        items: list[tuple[IndexSnapshot, np.ndarray, int, float, float]],
    ) -> list[Any]:
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[int, int, float, float], list[int]] = {}
        for i, (snap, _, k, t, alpha) in enumerate(items):
            groups.setdefault((id(snap), k, t, alpha), []).append(i)
        for (_, k, t, alpha), members in groups.items():
            snap = items[members[0]][0]
            f_m = np.stack([items[i][1] for i in members]).astype(np.float32)
            for i, enhanced in zip(members, snap.cache.enhance(f_m, k, t, alpha), strict=True):
                out[i] = enhanced
        return out

    # ---------------------------------------------------------------- index reload

    async def reload(self, force: bool = False) -> bool:
        """Load a newly published version in the background of requests, then swap."""
        runtime = self.require_runtime()
        async with self.reload_lock:
            try:
                swapped = await asyncio.to_thread(runtime.poll_index, force)
            except Exception:
                self.metrics.index_reloads.labels(outcome="failed").inc()
                raise
            if swapped:
                self.metrics.index_reloads.labels(outcome="ok").inc()
                snap = runtime.snapshot
                self.metrics.set_index_version(snap.version if snap else None)
            return swapped

    async def poll_forever(self) -> None:
        last_error = ""
        while True:
            await asyncio.sleep(self.config.index_poll_s)
            if self.runtime is None:
                continue
            try:
                await self.reload()
                last_error = ""
            except Exception as exc:  # keep serving the old version; say why once
                if str(exc) != last_error:
                    log.warning("index reload failed, still serving the old version: %s", exc)
                    last_error = str(exc)

    async def load_runtime(self) -> None:
        try:
            self.runtime = await asyncio.to_thread(Runtime.from_settings, self.settings)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the runtime failed")
            return
        snap = self.runtime.snapshot
        self.metrics.set_index_version(snap.version if snap else None)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for batcher in [*self.encoders.values(), self.index_batcher, self.enhance_batcher]:
            await batcher.close()
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        self.generate_executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- middleware


class GuardMiddleware:
    """Request size limit (413) and per-route metrics, as plain ASGI (streaming-safe)."""

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.config.max_request_bytes
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > limit:
                response = JSONResponse(
                    {"error": "request_too_large", "detail": f"body over {limit} bytes"}, 413
                )
                await response(scope, receive, send_wrapper)
                return
        except ValueError:
            pass

        seen = {"bytes": 0}

        async def receive_limited() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise BodyTooLarge(f"body over {limit} bytes")
            return message

        try:
            await self.app(scope, receive_limited, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            metrics = self.state.metrics
            metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
            metrics.latency.labels(path).observe(elapsed)


# --------------------------------------------------------------------------- app


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
    _install_error_handlers(app)

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

    def require_user(request: Request) -> Role:
        return role_of(request)

    def require_admin(request: Request) -> Role:
        role = role_of(request)
        if role < Role.ADMIN:
            raise ApiError(403, "forbidden", "this route needs an admin key")
        return role

    user = [Depends(require_user)]

    def check_k(k: int, name: str = "k") -> None:
        if k > config.max_k:
            raise unprocessable("k_out_of_range", f"{name}={k} is above the limit {config.max_k}")

    # ---------------------------------------------------------------- health

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], dependencies=user)
    async def readyz() -> JSONResponse:
        """Readiness: the encoder and an index are loaded."""
        runtime = state.runtime
        snap = runtime.snapshot if runtime else None
        body = {
            "ready": bool(runtime and snap),
            "encoder": runtime is not None,
            "index_version": snap.version if snap else None,
            "generator": bool(runtime and runtime.generator is not None),
            "error": state.load_error,
        }
        return JSONResponse(body, 200 if body["ready"] else 503)

    @app.get("/metrics", tags=["ops"], dependencies=user)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # ---------------------------------------------------------------- embed

    embed_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": s.EmbedRequest.model_json_schema()},
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

    @app.post(
        "/v1/embed",
        response_model=s.EmbedResponse,
        dependencies=user,
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

    @app.post("/v1/search", response_model=s.SearchResponse, dependencies=user, tags=["v1"])
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

    @app.get(
        "/v1/images/{row_id}",
        dependencies=user,
        tags=["v1"],
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": s.ErrorResponse}},
    )
    async def image(row_id: int) -> Response:
        """The thumbnail JPEG stored with a row (404 when the row or its thumbnail is absent)."""
        _, snap = state.require_snapshot()
        table = snap.table
        if "thumbnail" not in table.table.schema.names:
            raise ApiError(404, "not_found", "this cache stores no thumbnails")
        rows = await asyncio.to_thread(table.rows, [row_id], ["id", "thumbnail"])
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

    @app.post("/v1/enhance", response_model=s.EnhanceResponse, dependencies=user, tags=["v1"])
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

    @app.post(
        "/v1/generate",
        dependencies=user,
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
        pieces = _stream_in_thread(runtime, body.prompt, visual, options, state.generate_executor)
        if not body.stream:
            text = "".join([p async for p in pieces])
            return s.GenerateResponse(text=text, neighbours=neighbours)

        async def events() -> AsyncIterator[str]:
            neighbours_json = [n.model_dump() for n in neighbours]
            yield _sse({"neighbours": neighbours_json}, event="neighbours")
            text = []
            try:
                async for piece in pieces:
                    text.append(piece)
                    yield _sse({"text": piece})
            except Exception as exc:
                log.exception("generation failed")
                yield _sse({"error": "generation_failed", "detail": type(exc).__name__}, "error")
                return
            yield _sse({"text": "".join(text)}, event="done")

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---------------------------------------------------------------- index + admin

    @app.get("/v1/index", response_model=s.IndexInfo, dependencies=user, tags=["v1"])
    async def index_info() -> s.IndexInfo:
        """The index version being served and its manifest."""
        runtime = state.require_runtime()
        snap = runtime.snapshot
        if snap is None:
            return s.IndexInfo(version=None, manifest=None, table_version=None, rows=None, dim=None)
        rows = await asyncio.to_thread(lambda: snap.rows)
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


def _sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


async def _stream_in_thread(
    runtime: Runtime,
    prompt: str,
    visual: np.ndarray | None,
    options: dict[str, Any],
    executor: ThreadPoolExecutor,
) -> AsyncIterator[str]:
    """The generator's text pieces, produced in a worker thread, consumed here as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        stream = runtime.generate_stream(prompt, visual, **options)
        try:
            for piece in stream:
                if stop.is_set():  # the client went away: stop spending tokens on it
                    break
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
        finally:
            stream.close()

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                break
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await worker


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes JSON ``{"error", "detail"}``; no traceback ever leaves the server."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.error, "detail": exc.detail}, exc.status, headers=exc.headers
        )

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.reason, "detail": str(exc), "source": exc.source}, status_code=422
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep location and message; never echo the input back (it can be megabytes of base64).
        detail = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", "")}
            for err in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": "request_too_large", "detail": str(exc)}, status_code=413)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed; see its log"}, 500
        )
