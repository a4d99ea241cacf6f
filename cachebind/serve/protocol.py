"""uvicorn's HTTP protocol with a deadline on the request head, and the server's limits.

uvicorn bounds an idle keep-alive connection but not one that sends half a request line and
then nothing: such connections are held until the client gives up, and enough of them make
uvicorn's ``limit_concurrency`` turn every new client away. ``HeadTimeoutProtocol`` closes a
connection whose request head is not complete ``header_timeout_s`` after it opened (or after
its previous response); the body's own deadline is the guard middleware's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cachebind.config import ServeConfig

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is pinned; without it uvicorn's h11 protocol, without the deadline
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def head_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol] | None:
    """An ``HttpToolsProtocol`` subclass that enforces ``header_timeout_s``; None without
    httptools."""
    if HttpToolsProtocol is None:
        return None

    class HeadTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            # Only a connection between requests (no head yet) is closed; a request being
            # answered is left to the request timeout.
            if (self.cycle is None or self.cycle.response_complete) and not (
                self.transport.is_closing()
            ):
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutProtocol


def uvicorn_limits(config: ServeConfig) -> dict[str, Any]:
    """The uvicorn settings that bound connections: keep-alive, concurrency, head deadline."""
    options: dict[str, Any] = {
        "timeout_keep_alive": config.keep_alive_s,
        "limit_concurrency": config.max_connections,
        # A request head (line + headers) over 16 KiB is refused by the h11 protocol too.
        "h11_max_incomplete_event_size": 16 * 1024,
    }
    protocol = head_timeout_protocol(config.header_timeout_s)
    if protocol is not None:
        options["http"] = protocol
    return options
