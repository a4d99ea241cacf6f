"""Running the app: ``serve_forever`` (the CLI) and ``start_server`` (tests, demo, notebooks)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from cachebind.config import Settings
from cachebind.errors import CachebindError
from cachebind.serve.app import create_app
from cachebind.serve.auth import KeyStore
from cachebind.serve.protocol import uvicorn_limits
from cachebind.serve.runtime import Runtime

log = logging.getLogger("cachebind.serve")


@dataclass
class ServerHandle:
    """A server running in a background thread of this process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: Any

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to finish in-flight requests and exit, then join its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(settings: Settings) -> None:
    """``cachebind serve``: uvicorn on ``serve.host:serve.port`` until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.serve.host,
            port=settings.serve.port,
            log_level="info",
            proxy_headers=False,
            timeout_graceful_shutdown=30,
            **uvicorn_limits(settings.serve, app.state.serve.metrics.count_refused),
        )
    )
    refused: list[Exception] = []

    def stop(exc: Exception) -> None:
        refused.append(exc)
        server.should_exit = True

    app.state.serve.on_fatal = stop
    server.run()
    if refused:
        # The runtime refused to serve (another encoder's table): the CLI prints why and
        # exits non-zero.
        raise refused[0]


def start_server(
    settings: Settings,
    runtime: Runtime | None = None,
    *,
    keys: KeyStore | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    wait_ready: bool = True,
    ready_timeout_s: float = 600.0,
) -> ServerHandle:
    """Start the app under uvicorn in a daemon thread and return once it accepts connections.

    ``port`` defaults to ``settings.serve.port``; 0 picks a free port (``handle.url`` tells
    which). With ``wait_ready`` it also waits until the runtime has loaded (when it is loaded
    from ``settings``) and the decode pool answers, raising RuntimeError with the error if
    either fails.
    """
    app = create_app(settings, runtime, keys=keys)
    port = settings.serve.port if port is None else port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        **uvicorn_limits(settings.serve, app.state.serve.metrics.count_refused),
    )
    server = uvicorn.Server(config)
    # uvicorn installs signal handlers only in the main thread; this one runs in its own.
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="cachebind-server", daemon=True
    )
    thread.start()
    handle = ServerHandle(url=f"http://{host}:{bound_port}", server=server, thread=thread, app=app)
    deadline = time.monotonic() + ready_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up (see its log)")
        if time.monotonic() > deadline:
            handle.stop()
            raise TimeoutError(f"server did not start within {ready_timeout_s} s")
        time.sleep(0.01)
    state = app.state.serve
    while wait_ready and (state.runtime is None or not state.media.ready):
        if state.load_error:
            handle.stop()
            if isinstance(state.load_failure, CachebindError):
                raise state.load_failure  # a refusal with its own message (the CLI prints it)
            raise RuntimeError(f"the serving runtime failed to load: {state.load_error}")
        if state.media.error:
            handle.stop()
            raise RuntimeError(state.media.error)
        if time.monotonic() > deadline:
            handle.stop()
            raise TimeoutError(f"runtime did not load within {ready_timeout_s} s")
        time.sleep(0.05)
    return handle
