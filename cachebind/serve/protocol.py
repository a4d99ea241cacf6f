"""uvicorn's HTTP protocols with limits on the request head and fair admission, and the
server's uvicorn settings.

uvicorn bounds neither the size of a request head (httptools keeps appending a header line that
never ends; h11 is bounded only by its own buffer) nor a connection that sends half a request
line and then nothing; such connections are held until the client gives up, and enough of them
make ``limit_concurrency`` turn every new client away. The protocols here, one for each parser:

- close a connection whose request head is not complete ``header_timeout_s`` after it opened
  (or after its previous response); the body's own deadline is the guard middleware's;
- count the head's bytes and header fields as they arrive and answer 431 past
  ``max_head_bytes`` / ``max_headers`` before the parser is given a byte past the cap;
- admit a connection only while its address is under its caps (``cachebind.serve.admission``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from cachebind.config import ServeConfig
from cachebind.serve.admission import AdmissionBook
from cachebind.serve.middleware import SECURITY_HEADERS

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is pinned; without it the h11 protocol serves
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("cachebind.serve")

LINGER_S = 2.0
"""After a 431 the connection reads (and drops) what the client still sends for this long
before closing: closing with unread bytes resets the connection, and the client may lose the
431 it was sent."""

HEAD_END = re.compile(rb"\n\r?\n")
"""The blank line that ends a request head (h11 accepts bare LF line ends)."""


@dataclass(frozen=True)
class HeadLimits:
    timeout_s: float
    max_bytes: int
    max_headers: int


def refusal(status: int, error: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response in the service's error shape that closes the connection."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in SECURITY_HEADERS),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class ConnectionLimits:
    """What both protocols add to uvicorn's: admission, the head deadline and the head count.

    A subclass feeds its parser in ``_receive`` and calls ``_head_complete`` when a head is
    whole; ``_in_head`` and ``_head_bytes`` follow the head being received.
    """

    limits: ClassVar[HeadLimits]
    book: ClassVar[AdmissionBook]
    on_refused: ClassVar[Callable[[str], None] | None]
    """Told the error tag of each connection refused (the app's metrics count them)."""
    # Set by uvicorn's protocols.
    transport: Any
    loop: asyncio.AbstractEventLoop
    cycle: Any
    client: tuple[str, int] | None

    _head_timer: asyncio.TimerHandle | None = None
    _linger: asyncio.TimerHandle | None = None
    _address: str | None = None
    _pending = False
    _in_head = True
    _head_bytes = 0

    # ---------------------------------------------------------------- admission

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.client:
            reason = self.book.admit(self.client[0])
            if reason is not None:
                # Closed at once: a refused connection must not linger and count towards
                # uvicorn's limit_concurrency, which is what the caps protect.
                self.transport.write(refusal(429, "too_many_connections", reason))
                self.transport.close()
                self._count_refusal("too_many_connections")
                return
            self._address, self._pending = self.client[0], True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
        if self._address is not None:
            self.book.release(self._address, pending=self._pending)
            self._address = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _head_complete(self) -> None:
        self._disarm()
        self._in_head = False
        self._head_bytes = 0
        if self._pending and self._address is not None:
            self.book.head_done(self._address)
        self._pending = False

    # ---------------------------------------------------------------- the head's deadline

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timeout)

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

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm()

    # ---------------------------------------------------------------- the head's size

    def data_received(self, data: bytes) -> None:
        if self._linger is not None or self.transport.is_closing():
            return  # refused: what still arrives is dropped unread
        self._receive(data)

    def eof_received(self) -> bool | None:
        if self._linger is not None:
            return None  # the client is done after a refusal: close (h11 would parse the EOF)
        return super().eof_received()  # type: ignore[misc]

    def _receive(self, data: bytes) -> None:
        """Feed ``data`` to the parser, counting the head (each protocol its own way)."""
        raise NotImplementedError

    def _count_refusal(self, error: str) -> None:
        on_refused = type(self).on_refused  # a staticmethod on the class that protocol_class made
        if on_refused is not None:
            on_refused(error)

    def _refuse_head(self, detail: str) -> None:
        self._disarm()
        self._count_refusal("head_too_large")
        self.transport.write(refusal(431, "head_too_large", detail))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _too_many_bytes(self) -> None:
        self._refuse_head(
            f"the request line and headers exceed {self.limits.max_bytes} bytes "
            "(serve.max_head_bytes)"
        )

    def _too_many_headers(self) -> None:
        self._refuse_head(
            f"the request has more than {self.limits.max_headers} header fields (serve.max_headers)"
        )


class _TooManyHeaders(Exception):
    """Raised from httptools' header callback; the parser stops and reports an error."""


if HttpToolsProtocol is not None:

    class HttpToolsLimits(ConnectionLimits, HttpToolsProtocol):  # type: ignore[misc]
        """httptools, fed at most what is left of the head's byte budget at a time.

        The parser calls back for a header only once it is whole, and keeps the part it has
        in memory, so the bytes are counted before they are fed. The bytes of a pipelined
        request that follow the previous one in the same piece are not counted, which bounds
        its head at twice the cap.
        """

        _headers = 0
        _header_overflow = False

        def _receive(self, data: bytes) -> None:
            while data and not self.transport.is_closing() and self._linger is None:
                if self._in_head:
                    room = self.limits.max_bytes - self._head_bytes
                    if room <= 0:
                        self._too_many_bytes()
                        return
                    piece, data = data[:room], data[room:]
                    self._head_bytes += len(piece)
                else:
                    piece, data = data, b""
                HttpToolsProtocol.data_received(self, piece)

        def on_message_begin(self) -> None:
            self._headers = 0
            super().on_message_begin()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._headers += 1
            if self._headers > self.limits.max_headers:
                self._header_overflow = True
                raise _TooManyHeaders
            super().on_header(name, value)

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers every parser error 400; the one this class raised is a 431.
            if self._header_overflow:
                self._too_many_headers()
            else:
                super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            self._head_complete()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0


class H11Limits(ConnectionLimits, H11Protocol):  # type: ignore[misc]  # eof_received: see there
    """h11, with the head found by its blank line as the bytes arrive.

    h11 parses a head only once it is whole; its own ``max_incomplete_event_size`` (set to
    the same cap) stays as a second bound for a pipelined head, which this does not count.
    """

    _tail = b""
    _lines = 0

    def _receive(self, data: bytes) -> None:
        if not self._in_head and self.conn.their_state is h11.IDLE:
            self._in_head, self._head_bytes, self._lines, self._tail = True, 0, 0, b""
        if self._in_head:
            window = self._tail + data
            end = HEAD_END.search(window)
            size = end.end() - len(self._tail) if end else len(data)
            self._head_bytes += size
            self._lines += data.count(b"\n", 0, size)
            self._tail = window[-3:]
            if self._head_bytes > self.limits.max_bytes:
                self._too_many_bytes()
                return
            # The request line and the blank line that ends the head are lines too.
            if self._lines > self.limits.max_headers + 2:
                self._too_many_headers()
                return
        H11Protocol.data_received(self, data)
        if self._in_head and self.conn.their_state is not h11.IDLE:
            self._head_complete()


def protocol_class(
    config: ServeConfig, on_refused: Callable[[str], None] | None = None
) -> type[asyncio.Protocol]:
    """A protocol class of ``config.http`` with its own admission book (one per server);
    ``on_refused`` is told the error tag of each connection it refuses."""
    base: type[ConnectionLimits] = H11Limits
    if config.http == "httptools":
        if HttpToolsProtocol is None:
            log.warning("httptools is not installed; serving with h11")
        else:
            base = HttpToolsLimits
    attributes = {
        "limits": HeadLimits(config.header_timeout_s, config.max_head_bytes, config.max_headers),
        "book": AdmissionBook(config.max_connections_per_address, config.max_pending_per_address),
        # staticmethod: a plain function stored on a class would be bound as a method.
        "on_refused": staticmethod(on_refused) if on_refused is not None else None,
    }
    return type(base.__name__, (base,), attributes)


def uvicorn_limits(
    config: ServeConfig, on_refused: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The uvicorn settings that bound connections: keep-alive, concurrency, the protocol."""
    return {
        "timeout_keep_alive": config.keep_alive_s,
        "limit_concurrency": config.max_connections,
        "h11_max_incomplete_event_size": config.max_head_bytes,
        "http": protocol_class(config, on_refused),
    }
