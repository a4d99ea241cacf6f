"""Cross-origin requests from the pages of the origins in ``serve.cors_origins`` (none by
default). The list is read at each request, so a reloaded configuration applies at once."""

from __future__ import annotations

from typing import Any

from cachebind.config import ServeConfig

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"authorization, content-type, x-api-key"
EXPOSE_HEADERS = b"retry-after, content-type"
PREFLIGHT_MAX_AGE_S = b"600"


class CorsMiddleware:
    """ASGI: answers an allowed origin's preflight itself (before any key check: a browser
    sends no credentials with it) and marks the responses to it readable by that origin."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    def _allowed(self, origin: bytes | None) -> bool:
        if origin is None:
            return False
        allowed = self.config.cors_origins
        return "*" in allowed or origin.decode("latin-1") in allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin")
        if not self._allowed(origin):
            await self.app(scope, receive, send)
            return
        assert origin is not None
        common = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        *common,
                        (b"access-control-allow-methods", ALLOW_METHODS),
                        (b"access-control-allow-headers", ALLOW_HEADERS),
                        (b"access-control-max-age", PREFLIGHT_MAX_AGE_S),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [*common, (b"access-control-expose-headers", EXPOSE_HEADERS)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_marked)
