"""OpenAI's error shape on the OpenAI-compatible routes.

Every error of the app (the key check, the size guard, validation, the handlers' own) is first
the native ``{"error": tag, "detail": ...}``; ``OpenAIErrorShape`` rewrites the ones answered on
these routes as ``{"error": {"message", "type", "param", "code"}}`` with a status the ``openai``
SDK maps to its exception types: a request the server cannot take (invalid, too large) is a 400.
An unexpected failure is answered here too, as a ``server_error`` 500: the app's catch-all
handler sits in Starlette's outermost middleware, beyond the reach of this one.
"""

from __future__ import annotations

import json
from typing import Any

from cachebind.serve.errors import ApiError

OPENAI_PATHS = frozenset(
    {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
)
# 413 (too large) and 422 (invalid) are both "a request this server will not take", which
# OpenAI answers with 400 (the SDK's BadRequestError).
STATUS = {413: 400, 422: 400}
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


# What a client learns of an unexpected failure (the details go to the log, never to it).
INTERNAL = {"error": "internal_error", "detail": "the server failed; see its log"}


def invalid(code: str, message: str, param: str | None = None, status: int = 400) -> ApiError:
    """An error of these routes that names the offending request field."""
    return ApiError(status, code, message, param=param)


def openai_body(status: int, native: Any) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-shaped body of a native error body."""
    status = STATUS.get(status, status)
    native = native if isinstance(native, dict) else {}
    code = native.get("error")
    message = str(native.get("detail") or code or "error")
    param = native.get("param")
    fields = native.get("fields")  # validation errors: [{loc, msg}, ...]
    if param is None and isinstance(fields, list) and fields and isinstance(fields[0], dict):
        param = _param(fields[0])
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param(error: dict[str, Any]) -> str | None:
    loc = [p for p in error.get("loc", []) if p != "body"]
    return ".".join(str(p) for p in loc) or None


class OpenAIErrorShape:
    """ASGI: error responses of the OpenAI-compatible paths in OpenAI's shape (successful and
    streaming responses pass untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in OPENAI_PATHS:
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []
        started = False  # whether a response start has gone out to the client

        async def send_out(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def send_shaped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"] = message
                return
            if message["type"] != "http.response.body" or "start" not in held:
                await send_out(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            try:
                native = json.loads(b"".join(chunks) or b"null")
            except ValueError:
                native = None
            await self._send_error(send_out, held["start"], native)

        try:
            await self.app(scope, receive, send_shaped)
        except Exception:
            if not started:
                start = {"type": "http.response.start", "status": 500, "headers": []}
                await self._send_error(send_out, start, INTERNAL)
            # The app's catch-all handler still logs it; it sends nothing once we have.
            raise

    @staticmethod
    async def _send_error(send: Any, start: dict[str, Any], native: Any) -> None:
        status, body = openai_body(start["status"], native)
        data = json.dumps(body).encode()
        headers = [
            (k, v)
            for k, v in start.get("headers", [])
            if k.lower() not in (b"content-length", b"content-type")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        await send({**start, "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
