"""What one app instance owns: the runtime, keys, metrics, micro-batchers and reload loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cachebind.config import Settings
from cachebind.errors import InputError
from cachebind.modalities import Modality
from cachebind.serve.auth import KeyStore
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.decoding import MediaDecoder
from cachebind.serve.errors import unavailable
from cachebind.serve.metrics import Metrics
from cachebind.serve.querylog import ServedQueryLog
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.store.errors import EncoderMismatchError

log = logging.getLogger("cachebind.serve")


class ServeState:
    """Everything one app instance owns: runtime, keys, metrics, batchers, background tasks."""

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
        # One thread for the model: torch already uses every core inside one call, and a
        # single worker lets the batcher grow batches while the model is busy.
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="cachebind-encoder")
        self.observe_generation()
        self.encoders: dict[Modality, MicroBatcher[Any, np.ndarray]] = {}
        self.index_batcher = MicroBatcher(
            self._search_batch,
            window_ms=self.config.batch_window_ms,
            max_batch=self.config.max_batch,
            max_inflight=2,
            on_batch=lambda n: self.metrics.batch_size.labels(batcher="index").observe(n),
            name="index",
        )
        self.enhance_batcher = MicroBatcher(
            self._enhance_batch,
            window_ms=self.config.batch_window_ms,
            max_batch=self.config.max_batch,
            max_inflight=2,
            on_batch=lambda n: self.metrics.batch_size.labels(batcher="enhance").observe(n),
            name="enhance",
        )
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

    # ---------------------------------------------------------------- batched work

    async def embed_one(self, modality: Modality, raw: Any, source: str) -> np.ndarray:
        """F_M of one raw input: decoded off the event loop (media in the sandbox, its own
        InputError), encoded micro-batched."""
        runtime = self.require_runtime()
        tensor = await self.media.decode(modality, raw, source)
        batcher = self.encoders.get(modality)
        if batcher is None:
            batcher = self.encoders[modality] = MicroBatcher(
                lambda tensors: list(runtime.encode_batch(modality, tensors)),
                window_ms=self.config.batch_window_ms,
                max_batch=self.config.max_batch,
                executor=self.model_executor,
                on_batch=lambda n: self.metrics.batch_size.labels(
                    batcher=f"encoder:{modality.value}"
                ).observe(n),
                name=f"encoder-{modality.value}",
            )
        f_m = await batcher.submit(tensor)
        if not np.isfinite(f_m).all():
            # Finite but enormous values (a float WAV of 1e30, an IMU file of 3e38) pass the
            # decoder and overflow the encoder: refused here, before a NaN reaches a search, a
            # blend or a generation batch that other requests share.
            raise InputError(
                source,
                "not_finite",
                "the encoder's output for this input is not finite "
                "(its values are far outside the modality's range)",
            )
        return f_m

    @staticmethod
    def _search_batch(
        items: list[tuple[IndexSnapshot, np.ndarray, int, tuple[str | None, ...]]],
    ) -> list[tuple[np.ndarray, np.ndarray] | ItemError]:
        # Queries of one batch may straddle an index swap, and each modality (or mix) is
        # searched with its own setting: group them by both.
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[int, tuple[str | None, ...]], list[int]] = {}
        for i, (snap, _, _, parts) in enumerate(items):
            groups.setdefault((id(snap), _part_key(parts)), []).append(i)
        for (_, parts), members in groups.items():
            snap = items[members[0]][0]
            k = max(items[i][2] for i in members)
            queries = np.stack([items[i][1] for i in members]).astype(np.float32)
            scores, ids = snap.index.search(queries, k, list(parts))
            for row, i in enumerate(members):
                kk = items[i][2]
                out[i] = (np.asarray(scores[row, :kk]), np.asarray(ids[row, :kk]))
        return out

    @staticmethod
    def _enhance_batch(
        items: list[tuple[IndexSnapshot, np.ndarray, int, float, float, tuple[str | None, ...]]],
    ) -> list[Any]:
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[int, int, float, float, tuple[str | None, ...]], list[int]] = {}
        for i, (snap, _, k, t, alpha, parts) in enumerate(items):
            groups.setdefault((id(snap), k, t, alpha, _part_key(parts)), []).append(i)
        for (_, k, t, alpha, parts), members in groups.items():
            snap = items[members[0]][0]
            f_m = np.stack([items[i][1] for i in members]).astype(np.float32)
            enhanced = snap.cache.enhance(f_m, k, t, alpha, list(parts))
            for i, one in zip(members, enhanced, strict=True):
                out[i] = one
        return out

    # ---------------------------------------------------------------- index reload

    async def reload(self, force: bool = False) -> bool:
        """Load a newly published version in the background of requests, then swap."""
        runtime = self.require_runtime()
        async with self.reload_lock:
            try:
                swapped = await asyncio.to_thread(runtime.poll_index, force)
            except Exception:
                self.metrics.index_reloads.labels(outcome="failed").inc()
                raise
            if swapped:
                self.metrics.index_reloads.labels(outcome="ok").inc()
                snap = runtime.snapshot
                self.metrics.set_index_version(snap.version if snap else None)
            return swapped

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
        self.observe_generation()

    def observe_generation(self) -> None:
        """The generation scheduler reports queue, occupancy, TTFT and tokens to /metrics."""
        scheduler = getattr(self.runtime, "scheduler", None)
        if scheduler is not None:
            scheduler.observer = self.metrics

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        batchers: list[MicroBatcher[Any, Any]] = [
            *self.encoders.values(),
            self.index_batcher,
            self.enhance_batcher,
        ]
        for batcher in batchers:
            await batcher.close()
        await self.media.close()
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        # After the batchers: every answered query is in the sample by now.
        await asyncio.to_thread(self.query_log.flush)


def _part_key(parts: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """A query's modalities as a grouping key: which parts, not how many or in what order."""
    return tuple(sorted(set(parts), key=lambda p: (p is None, p or "")))
