"""Raw query inputs -> model input tensors, never on the event loop.

Media (image, audio, video, depth, thermal, IMU, point clouds) are decoded in the isolated
worker pool of ``cachebind.sandbox`` (``Settings.sandbox``: a memory cap, a CPU cap and a
wall-clock deadline per input) under the budgets of ``Settings.input``. A decoder that crashes,
passes a cap or overruns costs its own input an ``InputError`` (``undecodable`` /
``too_large`` / ``too_slow``, HTTP 422) and nothing else; a full queue is HTTP 429 with
``Retry-After``. Text is tokenised in this process, on a small thread pool of its own: cheap,
but not free (a 1 MB text is tens of milliseconds the event loop must not spend).

The tensor comes back to this process, where the encoder micro-batchers take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cachebind.config import InputLimits, SandboxConfig
from cachebind.errors import InputError
from cachebind.modalities import Modality
from cachebind.preprocess import preprocess
from cachebind.sandbox import Sandbox, SandboxBusy, SandboxClosed, SandboxStats
from cachebind.serve.errors import ApiError, unavailable

log = logging.getLogger("cachebind.serve")

DecodeFn = Callable[..., Any]
"""``fn(modality, data, *, limits) -> tensor``, module-level (it runs in a worker, which
imports it by name)."""

PRELOAD = ("cachebind.preprocess",)
"""Imported by each worker before its memory cap (torch, PIL, PyAV are not charged to inputs)."""

_PROBE_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class MediaDecoder:
    """The app's decode pool: started and stopped with the app's lifespan.

    ``decoders`` maps each media modality to the function its workers run (by default
    ``cachebind.preprocess.preprocess`` for all of them); it is public so that a deployment
    can put its own decoder in front of one modality, in the same isolated workers.
    ``ready`` is true once a worker has answered; ``error`` says why not when the pool cannot
    start (``/readyz`` shows both).
    """

    def __init__(self, config: SandboxConfig, limits: InputLimits) -> None:
        self.config = config
        self.limits = limits
        self.decoders: dict[Modality, DecodeFn] = {
            m: preprocess for m in Modality if m is not Modality.TEXT
        }
        self.ready = False
        self.error: str | None = None
        self._sandbox: Sandbox | None = None
        self._probe: asyncio.Task[None] | None = None
        # One thread: tokenising holds the GIL, so more threads only take it from the event loop
        # (measured: /healthz stalled 1.5 s with a default pool during 15 MB of texts, 0.5 s
        # with one thread). serve.max_text_bytes bounds how long one request can hold it.
        self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="cachebind-text")

    # ---------------------------------------------------------------- lifespan

    def start(self) -> None:
        """Start the workers (in the background) and probe them until one answers."""
        if self._sandbox is None:
            self._sandbox = Sandbox(self.config, preload=PRELOAD)
        self._watch()

    def _watch(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_ready())

    async def _probe_until_ready(self) -> None:
        attempt = 0
        while self._sandbox is not None:
            try:
                await self._sandbox.run_async(os.getpid, source="<probe>", timeout=120)
            except (SandboxBusy, InputError):
                pass  # workers busy, or one died under a task: they run, which is the point
            except SandboxClosed:
                return
            except Exception as exc:
                self.ready = False
                self.error = f"the decode pool cannot start: {type(exc).__name__}: {exc}"
                log.warning("%s", self.error)
                await asyncio.sleep(_PROBE_BACKOFF_S[min(attempt, len(_PROBE_BACKOFF_S) - 1)])
                attempt += 1
                continue
            self.ready, self.error = True, None
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
        sandbox, self._sandbox = self._sandbox, None
        self.ready = False
        if sandbox is not None:
            await asyncio.to_thread(sandbox.close)
        self._text_pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> SandboxStats | None:
        """Busy workers, queue depth and restarts by reason (None before ``start``)."""
        return self._sandbox.stats() if self._sandbox is not None else None

    # ---------------------------------------------------------------- decoding

    async def decode(
        self,
        modality: Modality,
        raw: Any,
        source: str,
        decoder: DecodeFn | None = None,
        **options: Any,
    ) -> Any:
        """One input's model tensor (``decoder``: another module-level function than the
        modality's, called with ``options`` too). Cancelling the caller (a request past its
        time budget) kills the worker decoding it, or takes it off the queue."""
        if modality is Modality.TEXT:
            loop = asyncio.get_running_loop()
            work = functools.partial(preprocess, modality, raw, source=source, limits=self.limits)
            return await loop.run_in_executor(self._text_pool, work)
        sandbox = self._sandbox
        if sandbox is None:
            raise unavailable("the decode pool is not running")
        try:
            return await sandbox.run_async(
                decoder or self.decoders[modality],
                modality.value,
                raw,
                source=source,
                limits=self.limits,
                **options,
            )
        except SandboxBusy as exc:
            raise ApiError(
                429,
                "busy",
                f"{exc}: too many inputs are being decoded",
                headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
            ) from None
        except SandboxClosed:
            raise unavailable("the server is shutting down") from None
        except (InputError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a worker that cannot be started: the pool, not the input
            self.ready = False
            self.error = f"the decode pool cannot start: {type(exc).__name__}: {exc}"
            self._watch()
            raise unavailable(self.error) from None
