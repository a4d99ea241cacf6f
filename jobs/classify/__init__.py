"""``cachebind classify --ray``: zero-shot labels of a large table as a Ray job.

    python -m jobs.classify --labels labels.txt [--templates FILE] [--top-k K] [--config FILE]

It takes the same flags as ``cachebind classify`` (which it runs with ``--ray``).

The unit of work is a Lance fragment of the pinned table version. The driver builds the class
matrix once (text prompts only), skips fragments whose ids are all labelled already, keeps at
most ``2 x CPUs`` fragment tasks in flight, and commits each task's rows through the same
exactly-once writer as the local run: a killed job started again labels only what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.analysis.classify import label_rows
from cachebind.analysis.zero_shot import ClassifyResult, start_run
from cachebind.config import Settings
from cachebind.store.table import vectors_to_numpy
from jobs.embed.plan import init_ray


def label_fragment(
    uri: str,
    storage_options: dict[str, str] | None,
    version: int,
    fragment_id: int,
    classes: np.ndarray,
    labels: list[str],
    top_k: int,
    batch_rows: int,
) -> pa.Table:
    """The label rows of one fragment (a Ray task: it reopens the dataset by URI)."""
    import lance

    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    fragment = dataset.get_fragment(fragment_id)
    if fragment is None:  # the driver listed it from this very version
        raise LookupError(f"fragment {fragment_id} is not in {uri} at version {version}")
    parts = [
        label_rows(
            batch.column("id").to_numpy(),
            vectors_to_numpy(batch.column("vector")),
            classes,
            labels,
            top_k,
            version,
        )
        for batch in fragment.to_batches(columns=["id", "vector"], batch_size=batch_rows)
    ]
    # The driver submits only fragments that hold rows, so there is at least one part.
    return pa.concat_tables(parts)


def run_classify(
    settings: Settings,
    labels: Sequence[str],
    *,
    templates: Sequence[str] | None = None,
    top_k: int | None = None,
    encoder: Any = None,
    truth_column: str | None = None,
    replace: bool = False,
) -> ClassifyResult:
    import ray

    run = start_run(settings, labels, templates, top_k, encoder, replace)
    started_ray = init_ray(settings.embed)
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(label_fragment)
        classes = ray.put(run.classes)
        dataset = run.table.dataset
        todo = []
        for fragment in dataset.get_fragments():
            ids = fragment.to_table(columns=["id"])["id"].to_numpy()
            if len(ids) and not run.writer.done.contains(ids).all():
                todo.append(fragment.fragment_id)
        limit = 2 * max(int(ray.available_resources().get("CPU", 1)), 1)
        pending: list[Any] = []
        labelled = 0
        args = (
            str(dataset.uri),
            run.table.storage_options,
            run.table.version,
        )
        for fid in todo:
            pending.append(
                task.remote(
                    *args,
                    fid,
                    classes,
                    run.label_set.labels,
                    run.label_set.top_k,
                    settings.analysis.batch_rows,
                )
            )
            if len(pending) >= limit:
                done, pending = ray.wait(pending, num_returns=1)
                labelled += run.writer.append(ray.get(done[0]))
        for ref in pending:
            labelled += run.writer.append(ray.get(ref))
    finally:
        if started_ray:
            ray.shutdown()
    return run.finish(labelled, truth_column)
