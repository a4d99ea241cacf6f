"""The micro-batcher every service builds the same way: the configured window and size, the
batch size observed in the metrics under the batcher's name."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import TypeVar

from cachebind.config import ServeConfig
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.metrics import Metrics

Item = TypeVar("Item")
Result = TypeVar("Result")


def service_batcher(
    fn: Callable[[list[Item]], Sequence[Result | ItemError]],
    config: ServeConfig,
    metrics: Metrics,
    name: str,
    *,
    executor: concurrent.futures.Executor | None = None,
    max_inflight: int = 1,
) -> MicroBatcher[Item, Result]:
    """A batcher of ``fn`` whose batch sizes go to ``batch_size{batcher=name}``."""
    histogram = metrics.batch_size.labels(batcher=name)
    return MicroBatcher(
        fn,
        window_ms=config.batch_window_ms,
        max_batch=config.max_batch,
        executor=executor,
        max_inflight=max_inflight,
        on_batch=histogram.observe,
        name=name.replace(":", "-"),
    )
