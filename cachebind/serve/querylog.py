"""The service's query log: every answered query's F_M, sampled per modality, kept on disk.

What is logged: each input's own unit-norm embedding F_i under its modality, the
embedding the encoder made of the text or medium a client sent. A weighted mix is logged as its
parts, each under its own modality, not as the blended F_M: a query set has to be one
distribution for its measured recall to mean anything, and a mix's recall is bounded by its
weakest part (which is what its response reports). A client's raw embedding is logged only when
the client says which modality it embeds (``modality`` on the input) and
``serve.query_log.raw_embeddings`` is on; an unlabelled one is of no known distribution and is
never logged. The raw input itself (text, bytes) is never kept.

The sample lives in memory (``cachebind.published.querylog.QueryLog``, thread-safe, bounded)
and is written atomically to ``query_log_path(index.dir)`` every ``flush_interval_s`` when it
changed, and on shutdown, in a worker thread. It is read back at start, so it survives a
restart; an index reload swaps the snapshot, never the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cachebind.config import QueryLogConfig
from cachebind.published.querylog import QueryLog, query_log_path

log = logging.getLogger("cachebind.serve")


class ServedQueryLog:
    """The query log of one app: ``record`` from handlers, ``flush_forever`` as a task."""

    def __init__(self, config: QueryLogConfig, index_dir: Path | str) -> None:
        self.config = config
        self.path = query_log_path(index_dir)
        self.sample: QueryLog | None = None
        if config.enabled:
            # Read once at start (before the first request): the file is bounded by capacity.
            self.sample = QueryLog.load(self.path, config.capacity_per_modality)
        self._saved_seen = self._seen()
        self._last_error = ""
        # The periodic flush and the one at shutdown may overlap (a cancelled task's thread
        # runs on): one write at a time.
        self._flush_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.sample is not None

    def record(self, parts: Iterable[tuple[str | None, np.ndarray, bool]]) -> None:
        """Offer a served query's parts: (modality or None for unlabelled, unit F_i [d],
        whether F_i is a client's raw embedding)."""
        if self.sample is None:
            return
        for modality, vector, raw in parts:
            if modality is None or (raw and not self.config.raw_embeddings):
                continue
            try:
                self.sample.add(modality, vector)
            except ValueError as exc:  # e.g. another dimension after an encoder change
                log.warning("query log: %s query not logged: %s", modality, exc)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{modality: {"seen", "kept", "dim"}}`` of the sample (empty when disabled)."""
        return self.sample.counts() if self.sample is not None else {}

    def _seen(self) -> int:
        return sum(c["seen"] for c in self.counts().values())

    def flush(self) -> bool:
        """Write the sample if it changed since the last write (blocking: call in a thread).

        Returns True when it wrote. A failure is logged (once per distinct error) and the
        sample kept for the next try: the service never fails a query for its log.
        """
        if self.sample is None:
            return False
        with self._flush_lock:
            seen = self._seen()
            if seen == self._saved_seen:
                return False
            try:
                self.sample.save(self.path)
            except OSError as exc:
                if str(exc) != self._last_error:
                    log.warning("query log: writing %s failed, will retry: %s", self.path, exc)
                    self._last_error = str(exc)
                return False
            self._saved_seen = seen
            self._last_error = ""
            return True

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            await asyncio.to_thread(self.flush)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/index`` says of the log: on or off, its capacity, per-modality counts."""
        return {
            "enabled": self.enabled,
            "capacity_per_modality": self.config.capacity_per_modality,
            "modalities": self.counts(),
        }
