"""A local table location on a multi-node cluster: proven shared, or refused before any work.

With the distributed sink every encoder actor writes fragments to the table location, so every
node must see it. An object store does; a local path does only on a shared file system (NFS,
Lustre, a cluster started on one machine). The proof: the driver writes a random token to a
file under the table location, and a task pinned to each alive node
(``NodeAffinitySchedulingStrategy``, not soft) reads it back. A node that cannot see the file,
or reads another one, refuses the job with a message that says what to do.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from cachebind.errors import CachebindError
from cachebind.storage import protocol_of

PROBE_TIMEOUT_S = 60.0


class TableNotSharedError(CachebindError):
    """The table is on a local path that some node of the cluster does not see."""


def _read_token(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_table_shared(uri: str) -> int:
    """Raise :class:`TableNotSharedError` unless every alive node sees ``uri`` (a local path)
    as the driver does; object-store locations pass as they are. Returns the nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if protocol_of(uri) != "file" or len(nodes) <= 1:
        return len(nodes)
    root = Path(uri).resolve()  # as the workers get it (FragmentTarget.uri is absolute)
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    probe = root / f".cachebind-shared-{token[:12]}"
    probe.write_text(token)
    read = ray.remote(num_cpus=0, max_retries=0)(_read_token)
    try:
        refs: list[Any] = [
            read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in nodes
        ]
        seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        probe.unlink(missing_ok=True)
    blind = [
        n.get("NodeManagerAddress", n["NodeID"])
        for n, got in zip(nodes, seen, strict=True)
        if got != token
    ]
    if blind:
        raise TableNotSharedError(
            f"the table location {uri} is a local path that {len(blind)} of the cluster's "
            f"{len(nodes)} nodes do not see ({', '.join(blind)}): workers write the table's "
            "fragments where they run. Put the table on an object store (store.uri = "
            '"s3://bucket/prefix") or on a file system mounted at the same path on every node.'
        )
    return len(nodes)
