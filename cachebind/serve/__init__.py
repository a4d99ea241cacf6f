"""serve: the HTTP service (FastAPI), its runtime, micro-batching, auth, metrics and web page."""

from cachebind.serve.app import create_app
from cachebind.serve.runtime import IndexSnapshot, PublishedIndexLoader, Runtime
from cachebind.serve.server import ServerHandle, serve_forever, start_server

__all__ = [
    "IndexSnapshot",
    "PublishedIndexLoader",
    "Runtime",
    "ServerHandle",
    "create_app",
    "serve_forever",
    "start_server",
]
