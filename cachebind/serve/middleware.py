"""ASGI guard (key, size and read time of the body, disconnects, security headers, per-route
metrics) and the JSON error handlers of the app."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cachebind.errors import InputError
from cachebind.serve.deps import role_of
from cachebind.serve.errors import ApiError
from cachebind.serve.signing import is_signed
from cachebind.serve.state import ServeState

log = logging.getLogger("cachebind.serve")


# Security headers of every response. The page loads only its own script and stylesheet and
# shows thumbnails as blob: URLs; nothing may frame it.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# The /docs and /redoc pages load Swagger UI / ReDoc from this server (serve.docs), started
# by an inline script.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


def is_keyed(scope: dict[str, Any]) -> bool:
    """Whether the request goes to a route behind a key (every ``/v1`` route and ``/metrics``).

    An unknown path stays the router's 404, with or without a key.
    """
    path = scope.get("path", "")
    if not (path.startswith("/v1/") or path == "/metrics"):
        return False
    # A preflight carries no key by design; a signed thumbnail URL is checked by its route.
    if scope.get("method") == "OPTIONS" or is_signed(scope):
        return False
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    return any(route.matches(scope)[0] is not Match.NONE for route in routes)


class GuardMiddleware:
    """What every request passes before the app sees it, as plain ASGI (streaming-safe).

    In order: the key (401 before a byte of the body is read), the declared size (413), then the
    body itself, counted as it arrives against ``max_request_bytes`` (413) and read within
    ``body_timeout_s`` (408). The app then runs as a task of its own that is cancelled when the
    client disconnects, so the work of a request whose client left stops at its next ``await``
    (queued batch items are skipped, a generation stops at its next token). Every response gets
    the security headers; every request counts in the per-route metrics.
    """

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        progress = {"code": 500, "complete": False}
        csp = (DOCS_CSP if scope.get("path") in DOCS_PATHS else CSP).encode()

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                progress["code"] = message["status"]
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                extra = [*SECURITY_HEADERS, (b"content-security-policy", csp)]
                headers += [(n, v) for n, v in extra if n not in present]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                progress["complete"] = True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_wrapper)
                return
            body = await self._read_body(receive)
            if isinstance(body, Response):
                await body(scope, receive, send_wrapper)
                return
            if body is None:  # the client left before sending its whole body
                return
            await self._run_app(scope, body, receive, send_wrapper, progress)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            metrics = self.state.metrics
            metrics.requests.labels(path, scope["method"], str(progress["code"])).inc()
            metrics.latency.labels(path).observe(elapsed)

    def _refusal(self, scope: dict[str, Any]) -> Response | None:
        """A 401 or 413 decided from the request head alone, before the body is read."""
        if is_keyed(scope):
            try:
                role_of(self.state, Request(scope))
            except ApiError as exc:
                return _error(exc.status, exc.error, exc.detail, exc.headers)
        limit = self.state.config.max_request_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > limit:
                return _error(413, "request_too_large", f"body over {limit} bytes")
        except ValueError:
            pass
        return None

    async def _read_body(self, receive: Any) -> bytes | Response | None:
        """The whole body, or the 413/408 to answer instead, or None if the client left."""
        config = self.state.config
        limit = config.max_request_bytes
        chunks: list[bytes] = []
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return _error(
                    408, "body_timeout", f"the body did not arrive within {config.body_timeout_s} s"
                )
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                # Answer at once, without reading the rest (the connection is then closed).
                return _error(413, "request_too_large", f"body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run_app(
        self,
        scope: dict[str, Any],
        body: bytes,
        receive: Any,
        send: Any,
        progress: dict[str, Any],
    ) -> None:
        disconnected = asyncio.Event()
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, replay, send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not progress["complete"] and not task.done():
                        task.cancel()  # nobody is left to answer: stop the work
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:  # the server itself is stopping
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task.cancelled():
            if not disconnected.is_set():
                raise asyncio.CancelledError
            return
        task.result()  # re-raise what the app raised


def _error(
    status: int, error: str, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    # Refused before the body was read: close the connection rather than read the rest.
    return JSONResponse(
        {"error": error, "detail": detail},
        status,
        headers={**(headers or {}), "Connection": "close"},
    )


def _text(detail: Any, fallback: str) -> str:
    """An error's ``detail`` as the one type every error body has: a sentence."""
    if detail is None:
        return fallback
    return detail if isinstance(detail, str) else str(detail)


HTTP_ERROR_TAGS = {
    404: "not_found",
    405: "method_not_allowed",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes JSON ``{"error", "detail"}``; no traceback ever leaves the server."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.error, "detail": _text(exc.detail, exc.error)}
        if exc.param is not None:
            body["param"] = exc.param
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.reason, "detail": str(exc), "source": exc.source}, status_code=422
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep location and message; never echo the input back (it can be megabytes of base64).
        for err in exc.errors():
            loc = err.get("loc", ())
            if err.get("type") == "too_long" and loc and loc[-1] == "inputs":
                return JSONResponse(
                    {"error": "too_many_inputs", "detail": err.get("msg", "")}, status_code=413
                )
        fields = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", "")}
            for err in exc.errors()
        ]
        # ``detail`` is a sentence on every error; the fields at fault are listed beside it.
        detail = "; ".join(f"{'.'.join(f['loc'][1:] or f['loc'])}: {f['msg']}" for f in fields)
        return JSONResponse(
            {"error": "invalid_request", "detail": detail, "fields": fields}, status_code=422
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Raised by the framework itself: an unknown route, a wrong method, a body it could
        # not parse. Same shape as ours. A body that is not UTF-8 JSON is the same mistake as
        # one that is not JSON at all, which the handlers answer with 422 bad_json.
        if exc.status_code == 400:
            return JSONResponse(
                {"error": "bad_json", "detail": f"the body is not JSON: {exc.detail}"}, 422
            )
        error = HTTP_ERROR_TAGS.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": error, "detail": _text(exc.detail, error)},
            exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed; see its log"}, 500
        )
