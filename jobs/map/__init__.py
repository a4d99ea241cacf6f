"""``cachebind map --ray``: the map of a large table as a Ray job.

    python -m jobs.map [--method umap|pca] [--sample N] [--config FILE]

It takes the same flags as ``cachebind map`` (which it runs with ``--ray``).

The driver fits the layout on a seeded sample (or reads back the model a stopped run stored),
puts it in the object store once, and places the pinned table version's row ranges
(``analysis.map_partition_rows``) as Ray tasks, at most ``2 x CPUs`` in flight; each task's rows
are staged by the driver in one commit. A job killed part way and started again places only
the ranges not staged yet, so each row is placed once; the positions equal a local run's
(:mod:`cachebind.analysis.map_run`: the same model, ranges and batches).
"""

from __future__ import annotations

from typing import Any, Literal

from cachebind.analysis.map_run import MapResult, place_partition, start_map
from cachebind.config import Settings
from jobs.embed.plan import init_ray


def run_map(settings: Settings, method: Literal["umap", "pca"] | None = None) -> MapResult:
    import ray

    run = start_map(settings, method)
    started_ray = init_ray(settings.embed)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(place_partition)
        projection = ray.put(run.projection)
        limit = 2 * max(int(ray.available_resources().get("CPU", 1)), 1)
        pending: list[Any] = []
        for part in run.todo():
            # The fitted model travels to the object store once, not once per task.
            pending.append(task.remote(*run.task_args(part, projection)))
            if len(pending) >= limit:
                done, pending = ray.wait(pending, num_returns=1)
                run.stage(ray.get(done[0]))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            run.stage(ray.get(done[0]))
    finally:
        if started_ray:
            ray.shutdown()
    return run.finish()
