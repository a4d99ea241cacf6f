"""Which Ray a command runs on: the configured address, the cluster of a ``ray job submit``, or a
new local instance -- never whatever other Ray happens to run on the machine.

Ray's own default (``ray.init()`` with no address) joins the latest cluster started on the
machine, so two commands (or two test processes) started side by side would share one
instance, and a ``num_cpus`` meant for a new instance makes the join fail.
"""

from __future__ import annotations

import os
from typing import Any


def ray_address(configured: str | None) -> str | None:
    """The address to pass to ``ray.init``: ``configured`` when set (``"auto"`` joins a cluster
    started with ``ray start``); unset, inside ``ray job submit`` (``RAY_ADDRESS``) Ray's default
    joins that job's cluster, and anywhere else ``"local"`` starts a new instance."""
    if configured:
        return configured
    return None if os.environ.get("RAY_ADDRESS") else "local"


def start_or_join_ray(
    configured: str | None, *, num_cpus: int | None = None, **kwargs: Any
) -> bool:
    """Start or join Ray (see :func:`ray_address`); returns True when this call initialised it,
    so that the caller knows to shut it down. ``num_cpus`` applies to a new local instance only."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(configured)
    if address == "local" and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    return True
