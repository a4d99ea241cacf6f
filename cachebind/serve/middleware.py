"""ASGI guard (request size, per-route metrics) and the JSON error handlers of the app."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cachebind.errors import InputError
from cachebind.serve.errors import ApiError
from cachebind.serve.state import ServeState

log = logging.getLogger("cachebind.serve")


class BodyTooLarge(Exception):
    """The request body went past ``ServeConfig.max_request_bytes`` while being read."""


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


HTTP_ERROR_TAGS = {
    404: "not_found",
    405: "method_not_allowed",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
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
            {"error": error, "detail": exc.detail}, exc.status_code, headers=exc.headers
        )

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": "request_too_large", "detail": str(exc)}, status_code=413)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed; see its log"}, 500
        )
