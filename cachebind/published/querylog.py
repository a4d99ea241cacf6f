"""A bounded sample of the query embeddings F_M a service answered, per modality.

The index is tuned on the queries it really serves: the service adds each query's
embedding F_M here, and ``cachebind index build | add | tune`` read the sample back as one query
set per modality (``<modality>:query_log``). Only embeddings are kept, never the raw input (text,
audio, pixels): a float32 vector per query, so the file says nothing a nearest-neighbour search of
the cache would not.

Each modality keeps a uniform reservoir sample (Vitter's Algorithm R) of at most
``capacity_per_modality`` vectors of everything it was given, so the file stays bounded however
long the service runs, and old traffic fades in proportion as new traffic arrives. The file,
``<index.dir>/query_log.npz``, is written atomically (temporary file in the same directory, fsync,
``os.replace``): a reader sees the old sample or the new one, never half of one. It sits beside
``versions/`` and ``CURRENT``, which version listing and pruning never look outside of.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cachebind.arrays import Floats

log = logging.getLogger(__name__)

QUERY_LOG_FILENAME = "query_log.npz"
QUERY_LOG_FORMAT = 1
STATE_KEY = "state"
"""The npz entry holding the JSON state (uint8 bytes: loading never needs pickle)."""
MODALITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""A modality name becomes an npz key and part of a query-set name: a short lowercase word."""
MAX_FILE_BYTES = 4 * 2**30
"""A query log larger than this is refused as corrupt rather than read into memory."""


def query_log_path(index_dir: Path | str) -> Path:
    """Where the service keeps the log of ``index_dir``'s queries."""
    return Path(index_dir) / QUERY_LOG_FILENAME


def _check_modality(modality: str) -> str:
    if not isinstance(modality, str) or not MODALITY_RE.match(modality) or modality == STATE_KEY:
        raise ValueError(f"modality must be a short lowercase name, got {modality!r}")
    return modality


class _Reservoir:
    """One modality's Algorithm R sample: ``rows[:kept]`` of ``seen`` vectors offered so far."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.dim = dim
        self.capacity = capacity
        self.seen = 0
        self.kept = 0
        self.rows = np.empty((min(capacity, 256), dim), np.float32)

    def _grow(self, need: int) -> None:
        if need > len(self.rows):
            size = min(self.capacity, max(need, 2 * len(self.rows)))
            rows = np.empty((size, self.dim), np.float32)
            rows[: self.kept] = self.rows[: self.kept]
            self.rows = rows

    def add(self, x: Floats, rng: np.random.Generator) -> None:
        # The first `capacity` vectors fill the reservoir; vector number i (0-based, i >=
        # capacity) then replaces a random slot with probability capacity / (i + 1).
        fill = max(0, min(len(x), self.capacity - self.seen))
        if fill:
            self._grow(self.kept + fill)
            self.rows[self.kept : self.kept + fill] = x[:fill]
            self.kept += fill
        rest = x[fill:]
        if len(rest):
            numbers = self.seen + fill + np.arange(len(rest))
            slots = rng.integers(0, numbers + 1)
            for row, slot in zip(
                rest[slots < self.capacity], slots[slots < self.capacity], strict=True
            ):
                self.rows[slot] = row
        self.seen += len(x)

    def sample(self) -> Floats:
        return self.rows[: self.kept].copy()


class QueryLog:
    """Per-modality reservoir samples of query embeddings F_M (float32 [d]); thread-safe.

    ``QueryLog(capacity_per_modality, seed)``; ``add(modality, vectors)`` from any thread;
    ``snapshot()`` the kept vectors; ``counts()`` how many were seen and kept; ``save(path)``
    atomically; ``QueryLog.load(path, capacity_per_modality, seed)`` survives a restart.
    """

    def __init__(self, capacity_per_modality: int, seed: int = 0) -> None:
        if int(capacity_per_modality) < 1:
            raise ValueError(f"capacity_per_modality must be >= 1, got {capacity_per_modality}")
        self.capacity = int(capacity_per_modality)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()
        self._sets: dict[str, _Reservoir] = {}

    def add(self, modality: str, vectors: Floats) -> None:
        """Offer query embeddings of ``modality`` (float32 [d] or [n, d], finite) to the sample.

        Raises ValueError (and keeps nothing of the call) for a wrong shape, a dimension other
        than the modality's earlier ones, or a non-finite value.
        """
        _check_modality(modality)
        x = np.asarray(vectors)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"query embeddings must be numeric [n, d], got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{modality} query embeddings contain NaN or infinite values")
        if len(x) == 0:
            return
        with self._lock:
            reservoir = self._sets.get(modality)
            if reservoir is None:
                reservoir = self._sets[modality] = _Reservoir(x.shape[1], self.capacity)
            elif reservoir.dim != x.shape[1]:
                raise ValueError(
                    f"{modality} query embeddings are {reservoir.dim}-d so far, got {x.shape[1]}-d"
                )
            reservoir.add(x, self._rng)

    def snapshot(self) -> dict[str, Floats]:
        """The kept vectors of each modality (copies, float32 [kept, d])."""
        with self._lock:
            return {m: r.sample() for m, r in self._sets.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """``{modality: {"seen": offered so far, "kept": in the sample, "dim": d}}``."""
        with self._lock:
            return {
                m: {"seen": r.seen, "kept": r.kept, "dim": r.dim} for m, r in self._sets.items()
            }

    def _state(self) -> tuple[dict[str, Any], dict[str, Floats]]:
        with self._lock:
            arrays = {m: r.sample() for m, r in self._sets.items()}
            state = {
                "format": QUERY_LOG_FORMAT,
                "capacity_per_modality": self.capacity,
                "modalities": {m: {"seen": r.seen, "dim": r.dim} for m, r in self._sets.items()},
            }
        return state, arrays

    def save(self, path: Path | str) -> None:
        """Write the sample to ``path`` atomically (tmp file beside it, fsync, os.replace)."""
        path = Path(path)
        state, arrays = self._state()
        buffer = io.BytesIO()
        encoded = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
        np.savez(buffer, **{STATE_KEY: encoded}, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path | str, capacity_per_modality: int, seed: int = 0) -> QueryLog:
        """The log saved at ``path``; empty when there is none or it is unreadable (logged).

        A ``capacity_per_modality`` below what was stored keeps a uniform random subset, so
        the sample stays a uniform sample of everything seen.
        """
        out = cls(capacity_per_modality, seed)
        path = Path(path)
        try:
            state, arrays = read_log_file(path)
        except FileNotFoundError:
            return out
        except Exception as e:  # a torn disk, another program's file: start afresh, loudly
            log.warning("query log %s is unreadable (%s): starting an empty one", path, e)
            return out
        # Continue the stream where it stopped: a fresh generator per (seed, total seen), so a
        # restart does not replay the random choices the previous run made.
        seen_total = sum(int(v["seen"]) for v in state["modalities"].values())
        out._rng = np.random.default_rng([out.seed, seen_total])
        for modality, rows in arrays.items():
            info = state["modalities"][modality]
            if len(rows) > out.capacity:
                rows = rows[np.sort(out._rng.choice(len(rows), out.capacity, replace=False))]
            reservoir = _Reservoir(int(info["dim"]), out.capacity)
            reservoir._grow(len(rows))
            reservoir.rows[: len(rows)] = rows
            reservoir.kept = len(rows)
            reservoir.seen = max(int(info["seen"]), len(rows))
            out._sets[modality] = reservoir
        return out


def read_log_file(path: Path) -> tuple[dict[str, Any], dict[str, Floats]]:
    """(state, {modality: float32 [n, d]}) of a query log file; ValueError if malformed."""
    path = Path(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes is larger than a query log can be")
    with np.load(path, allow_pickle=False) as data:
        if STATE_KEY not in data.files:
            raise ValueError("no state entry")
        state = json.loads(bytes(data[STATE_KEY].astype(np.uint8)).decode())
        if not isinstance(state, dict) or state.get("format") != QUERY_LOG_FORMAT:
            raise ValueError(f"unknown query log format {state.get('format')!r}")
        modalities = state.get("modalities")
        if not isinstance(modalities, dict):
            raise ValueError("state has no modalities")
        arrays = {}
        for modality, info in modalities.items():
            _check_modality(modality)
            rows = data[modality]
            dim = int(info["dim"])
            if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[1] != dim:
                raise ValueError(f"{modality}: {rows.dtype} {rows.shape}, not float32 [n, {dim}]")
            if not np.isfinite(rows).all():
                raise ValueError(f"{modality}: non-finite values")
            arrays[modality] = rows
    return state, arrays


def load_query_sets(index_dir: Path | str) -> dict[str, Floats]:
    """The logged query embeddings of ``index_dir`` per modality, for a build to tune on.

    Empty when there is no log; an unreadable one is logged and ignored (a build never fails
    for want of traffic).
    """
    path = query_log_path(index_dir)
    try:
        _, arrays = read_log_file(path)
    except FileNotFoundError:
        return {}
    except Exception as e:
        log.warning("query log %s is unreadable (%s): building without it", path, e)
        return {}
    return {m: rows for m, rows in arrays.items() if len(rows)}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
