"""The FastAPI app: ``create_app(settings, runtime)``.

This module only assembles the app: lifespan, middleware, the routers, the static web page
and the OpenAPI adjustments. The handlers live in ``routes/`` (one module per resource), the
dependencies they share in ``deps.py``; model loading in ``runtime.py``, per-app state and
batchers in ``state.py``, storage access in ``search.py``, request models in ``schemas.py``,
keys in ``auth.py``, the size guard and error handlers in ``middleware.py``, server-sent
events in ``streaming.py`` and the metrics in ``metrics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from cachebind.config import Settings
from cachebind.serve import schemas as s
from cachebind.serve.auth import KeyStore
from cachebind.serve.cors import CorsMiddleware
from cachebind.serve.deps import require_user
from cachebind.serve.docs import install_docs
from cachebind.serve.ids import id_format
from cachebind.serve.middleware import GuardMiddleware, install_error_handlers
from cachebind.serve.multipart import MultipartForms
from cachebind.serve.openai import routes as openai_routes
from cachebind.serve.openai.errors import OpenAIErrorShape
from cachebind.serve.routes import (
    admin,
    classify,
    collection_map,
    embed,
    enhance,
    export,
    extra_search,
    generate,
    images,
    ops,
    reports,
    search,
)
from cachebind.serve.runtime import Runtime
from cachebind.serve.signing import require_user_or_signature
from cachebind.serve.state import ServeState

STATIC_DIR = pathlib.Path(__file__).parent / "static"


def create_app(
    settings: Settings, runtime: Runtime | None = None, *, keys: KeyStore | None = None
) -> FastAPI:
    """The HTTP service over ``runtime`` (loaded from ``settings`` in the background if None).

    ``keys`` overrides the key files of ``settings.serve`` (an in-process client uses this).
    """
    state = ServeState(settings, runtime, keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.media.start()
        if state.runtime is None:
            state.tasks.append(asyncio.create_task(state.load_runtime()))
        else:
            snap = state.runtime.snapshot
            state.metrics.set_index_version(snap.version if snap else None)
        if state.config.index_poll_s > 0:
            state.tasks.append(asyncio.create_task(state.poll_forever()))
        if state.query_log.enabled:
            state.tasks.append(asyncio.create_task(state.query_log.flush_forever()))
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="cachebind",
        version="1",
        summary="ImageBind feature-cache service: embed, search, enhance, generate.",
        lifespan=lifespan,
        docs_url=None,  # served from local files by install_docs
        redoc_url=None,
    )
    app.state.serve = state
    app.add_middleware(MultipartForms, config=state.config)  # innermost: after the guard
    app.add_middleware(GuardMiddleware, state=state)
    app.add_middleware(OpenAIErrorShape)  # it also reshapes the guard's refusals
    # Outermost: preflights are answered before the key check, and errors stay readable.
    app.add_middleware(CorsMiddleware, config=state.config)
    install_error_handlers(app)

    # The order of the includes is the order of the paths in the OpenAPI document.
    app.include_router(ops.probes)
    app.include_router(admin.router)
    # Every route that needs a key. Its error responses are documented so that generated
    # clients know the one error shape; this also replaces FastAPI's default 422 schema,
    # which is not what the handlers send.
    for router in (
        ops.router,
        embed.router,
        search.router,
        extra_search.router,
        enhance.router,
        generate.router,
        classify.router,
        collection_map.router,
        export.router,
        reports.router,
        admin.info,
        openai_routes.router,
    ):
        app.include_router(
            router,
            dependencies=[Depends(require_user), Depends(id_format)],
            responses=s.COMMON_ERRORS,
        )
    # A thumbnail also opens with a signed URL (an <img src> cannot send a key).
    app.include_router(
        images.router, dependencies=[Depends(require_user_or_signature)], responses=s.COMMON_ERRORS
    )
    _document_embed_request(app)

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_docs(app)
    return app


def _document_embed_request(app: FastAPI) -> None:
    """Put ``EmbedRequest`` into the OpenAPI components.

    /v1/embed reads its body by hand (JSON or multipart), so FastAPI never sees the model and
    the route's ``$ref`` to it would dangle.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI's own, which also keeps it in app.openapi_schema
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # The generation stream's last event is described in words there, modelled here.
        for model in (s.EmbedRequest, s.GenerateDoneEvent):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = body
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
