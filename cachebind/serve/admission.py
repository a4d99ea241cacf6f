"""Fair admission: per client address, caps on open connections and on connections that have not
yet sent a whole request head.

uvicorn's ``limit_concurrency`` is one count for everybody: one address that opens (and keeps
reopening) idle sockets holds the server at it, and every other client, probes included, gets
503. Counting per address lets the others in while that address is refused. Clients behind one
NAT or proxy share an address, so the caps are generous; a reverse proxy in front does better
(see docs/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Counts:
    open: int = 0
    pending: int = 0


class AdmissionBook:
    """The connections of one server by client address; used from its event loop only."""

    def __init__(self, max_open: int, max_pending: int) -> None:
        self.max_open = max_open
        self.max_pending = max_pending
        self._by_address: dict[str, _Counts] = {}
        self.refused = 0

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address`` (pending until its head is complete);
        the reason it is refused instead, or None."""
        counts = self._by_address.setdefault(address, _Counts())
        reason = None
        if counts.open >= self.max_open:
            reason = (
                f"{counts.open} connections from {address} are open, the most one address may "
                f"hold (serve.max_connections_per_address); close some or reuse them"
            )
        elif counts.pending >= self.max_pending:
            reason = (
                f"{counts.pending} connections from {address} have not sent a whole request "
                f"head, the most one address may hold (serve.max_pending_per_address)"
            )
        if reason is not None:
            self.refused += 1
            if counts.open == 0:
                del self._by_address[address]
            return reason
        counts.open += 1
        counts.pending += 1
        return None

    def head_done(self, address: str) -> None:
        """The first request head of a connection from ``address`` is complete."""
        self._by_address[address].pending -= 1

    def release(self, address: str, *, pending: bool) -> None:
        """A connection from ``address`` closed (``pending``: before its first head)."""
        counts = self._by_address[address]
        counts.open -= 1
        counts.pending -= int(pending)
        if counts.open == 0:
            del self._by_address[address]

    def open_from(self, address: str) -> int:
        counts = self._by_address.get(address)
        return counts.open if counts else 0
