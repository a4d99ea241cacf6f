"""What one app instance owns, and when each part starts and stops: the runtime and its reload
loop, keys, metrics, the media decoder and the services (``serve.services``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from cachebind.config import Settings
from cachebind.modalities import Modality
from cachebind.serve.auth import KeyStore
from cachebind.serve.decoding import MediaDecoder
from cachebind.serve.errors import unavailable
from cachebind.serve.metrics import Metrics
from cachebind.serve.querylog import ServedQueryLog
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.serve.services import EncodeService, EnhanceService, GenerateService, SearchService
from cachebind.store.errors import EncoderMismatchError

log = logging.getLogger("cachebind.serve")


class ServeState:
    """Everything one app instance owns: runtime, keys, metrics, services, background tasks.

    Lifetimes only: the work itself (encoding, search, enhance, generation and their batch
    functions) is in ``serve.services``; this creates the services and closes them.
    """

    def __init__(self, settings: Settings, runtime: Runtime | None, keys: KeyStore | None) -> None:
        self.settings = settings
        self.config = settings.serve
        self.runtime = runtime
        self.load_error: str | None = None
        self.load_failure: Exception | None = None
        self.reload_error: str | None = None
        """Why the last reload of the index failed (the old version, if any, still serves)."""
        self.on_fatal: Callable[[Exception], None] | None = None
        """Called when the runtime cannot serve what it is configured for and waiting will
        not help (another encoder's table): ``cachebind serve`` stops and exits non-zero."""
        from_files = keys is None and self.config.auth
        if from_files:
            keys = self.read_keys()
        self.keys = keys
        # Key files are re-read on an admin reload (a new key needs no restart), unless the
        # caller handed keys in.
        self.keys_from_files = from_files
        self.metrics = Metrics()
        # Decoding of untrusted media: isolated worker processes (started by the lifespan).
        self.media = MediaDecoder(settings.sandbox, settings.input)
        self.metrics.watch_decoders(self.media.stats)
        self.encode = EncodeService(self.config, self.metrics, self.media)
        self.search = SearchService(self.config, self.metrics)
        self.enhance = EnhanceService(self.config, self.metrics)
        self.generate = GenerateService(self.config, self.metrics)
        self.generate.observe(runtime)
        self.reload_lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[Any]] = []
        # Beside the index versions, not in a snapshot: a reload never resets it.
        self.query_log = ServedQueryLog(self.config.query_log, settings.index.dir)
        secret = self.config.cursor_secret
        # Random per start unless configured: cursors then outlive neither a restart nor the
        # replica that issued them, which is what a page of a changing index should do anyway.
        self.cursor_secret = (
            secret.get_secret_value().encode("utf-8") if secret else secrets.token_bytes(32)
        )

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

    async def embed_one(self, modality: Modality, raw: Any, source: str) -> np.ndarray:
        """F_M of one raw input (``EncodeService.embed_one`` on this app's runtime)."""
        return await self.encode.embed_one(self.require_runtime(), modality, raw, source)

    # ---------------------------------------------------------------- index reload

    async def reload(self, force: bool = False) -> bool:
        """Load newly published versions (the main index and each extra encoder's) in the
        background of requests, then swap; True when any was swapped. Each index is polled
        whatever another's reload does; the first error is raised after."""
        runtime = self.require_runtime()
        async with self.reload_lock:
            swapped, errors = [], []
            for poll in (runtime.poll_index, runtime.poll_extra_indexes):
                try:
                    swapped.append(await asyncio.to_thread(poll, force))
                except Exception as exc:  # the old version stays
                    swapped.append(False)
                    errors.append(exc)
            for _ in range(sum(swapped)):
                self.metrics.index_reloads.labels(outcome="ok").inc()
            if swapped[0]:
                snap = runtime.snapshot
                self.metrics.set_index_version(snap.version if snap else None)
            if errors:
                self.metrics.index_reloads.labels(outcome="failed").inc()
                raise errors[0]
            return any(swapped)

    async def poll_forever(self) -> None:
        last_error = ""
        while True:
            await asyncio.sleep(self.config.index_poll_s)
            if self.runtime is None:
                continue
            try:
                await self.reload()
                last_error = ""
                self.reload_error = None
            except Exception as exc:  # keep serving the old version; say why once
                self.reload_error = f"{type(exc).__name__}: {exc}"
                if str(exc) != last_error:
                    log.warning("index reload failed, still serving the old version: %s", exc)
                    last_error = str(exc)

    async def load_runtime(self) -> None:
        try:
            self.runtime = await asyncio.to_thread(Runtime.from_settings, self.settings)
        except EncoderMismatchError as exc:
            self.load_error, self.load_failure = f"{type(exc).__name__}: {exc}", exc
            log.error("refusing to serve: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        except Exception as exc:
            self.load_error, self.load_failure = f"{type(exc).__name__}: {exc}", exc
            log.exception("loading the runtime failed")
            return
        snap = self.runtime.snapshot
        self.metrics.set_index_version(snap.version if snap else None)
        self.generate.observe(self.runtime)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.encode.close()
        await self.search.close()
        await self.enhance.close()
        await self.media.close()
        # After the batchers: every answered query is in the sample by now.
        await asyncio.to_thread(self.query_log.flush)
