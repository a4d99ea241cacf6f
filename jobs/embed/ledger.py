"""The driver's account of the fragments the workers wrote (distributed sink): which rows each
holds, which of them are kept, and when a fragment is complete (its descriptor and all its
rows received), so that :class:`jobs.embed.sink.Sink` can commit it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class PendingFragment:
    descriptor: str = ""
    """Lance fragment metadata (JSON); empty until its descriptor row arrived."""
    count: int = -1
    node: str = ""
    received: int = 0
    """Rows received that name this fragment (the next row's position in the file)."""
    kept: dict[int, tuple[int, str]] = field(default_factory=dict)
    """position in the file -> (id, partition) of each row the driver keeps."""


class FragmentLedger:
    def __init__(self) -> None:
        self.pending: dict[int, PendingFragment] = {}
        self.rewritten = 0
        """Fragments committed as a rewrite holding only their kept rows."""
        self.dropped = 0
        """Fragments never committed: every row in them was a replay."""
        self.committed = 0
        self._nodes: Counter[str] = Counter()

    def take(self, block: pa.Table, status: np.ndarray) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """Record a block's descriptor rows and remove them; returns the sample rows, their
        status, and each ``ok`` row's position in its fragment (-1 for other rows)."""
        is_fragment = status == "fragment"
        if is_fragment.any():
            columns = ["fragment_key", "fragment", "count", "node"]
            for row in block.filter(pa.array(is_fragment)).select(columns).to_pylist():
                frag = self.pending.setdefault(int(row["fragment_key"]), PendingFragment())
                frag.descriptor, frag.count = row["fragment"], int(row["count"])
                frag.node = row["node"] or ""
            block, status = block.filter(pa.array(~is_fragment)), status[~is_fragment]
        keys = block["fragment_key"].fill_null(0).to_numpy()
        positions = np.full(block.num_rows, -1, dtype=np.int64)
        for i in np.flatnonzero(status == "ok"):
            frag = self.pending.setdefault(int(keys[i]), PendingFragment())
            positions[i] = frag.received
            frag.received += 1
        return block, status, positions

    def keep(self, rows: pa.Table, positions: np.ndarray) -> None:
        """The driver keeps these ``ok`` rows (claims made): they go into the commit."""
        keys = rows["fragment_key"].to_numpy()
        ids = rows["id"].to_numpy()
        shards = rows["shard"].to_pylist()
        for key, pos, sid, shard in zip(keys, positions, ids, shards, strict=True):
            self.pending[int(key)].kept[int(pos)] = (int(sid), shard)

    def ready(self) -> list[PendingFragment]:
        """Remove and return the complete fragments (descriptor and every row received)."""
        done = [key for key, f in self.pending.items() if f.descriptor and f.received >= f.count]
        out = [self.pending.pop(key) for key in done]
        for frag in out:
            self._nodes[frag.node] += len(frag.kept)
            self.committed += 1 if frag.kept else 0
        return out

    def waiting(self) -> dict[int, str]:
        """id -> partition of kept rows whose fragment is not complete yet."""
        return {sid: shard for f in self.pending.values() for sid, shard in f.kept.values()}

    def take_nodes(self) -> dict[str, int]:
        """Rows committed per node (the worker's Ray node id) since the last call."""
        nodes, self._nodes = dict(self._nodes), Counter()
        return nodes
