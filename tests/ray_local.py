"""One local Ray per test process, shared by the modules that need a plain local cluster.

A local cluster costs about 6 CPU-seconds to start and stop (GCS, raylet, dashboard agent,
prestarted workers), and its workers pay their imports (torch, cachebind) again in every new
cluster: over a dozen modules, minutes of a 2-core machine. A module that needs a plain local
Ray calls ``use_local_ray(num_cpus)`` from a module fixture: the process's cluster is kept when it
has those CPUs, replaced when not. A module that needs a cluster of its own (other nodes, other
environment variables for its workers, Ray Serve) calls ``stop_local_ray()`` first and shuts
its own down when it ends. The conftest stops the shared one when the session ends.
"""

from __future__ import annotations

import ray

_started_with: dict[str, int] = {}


def use_local_ray(num_cpus: int) -> None:
    """This process's shared local Ray, with ``num_cpus`` CPUs."""
    if ray.is_initialized() and _started_with.get("num_cpus") == num_cpus:
        return
    stop_local_ray()
    if ray.is_initialized():  # a module's own cluster that it did not shut down
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    _started_with["num_cpus"] = num_cpus


def stop_local_ray() -> None:
    """Shut the shared cluster down (before a module starts one of its own)."""
    if _started_with.pop("num_cpus", None) is not None and ray.is_initialized():
        ray.shutdown()
