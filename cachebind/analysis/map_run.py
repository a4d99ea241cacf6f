"""Computing the map: fit once, place the table partition by partition, exactly once.

A run pins one version of the images table. The layout is fitted on a seeded sample (or, when
an earlier run with the same method, sample, seed and neighbours stopped part way, read back
from the model table it stored) and the table is cut into row ranges of
``analysis.map_partition_rows``. Each range is placed in batches of ``analysis.batch_rows`` by
:func:`place_partition` -- in this process (:func:`compute_map`) or as a Ray task
(``jobs/map.py``); both cut and batch the same way, so they give the same positions. A placed
range is one atomic append to a staging table, tagged with its range; a run started again
skips the ranges staged already. When every range is staged, the staging table is copied to
``<table>_map_v<version>`` in one streamed commit (a reader sees the previous map or the whole
new one) and dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.analysis.labelling import table_names
from cachebind.analysis.layout import (
    MAP_SCHEMA_FIELDS,
    METADATA_KEY,
    Projection,
    fit_projection,
    map_table_name,
    model_table_name,
    read_model,
    run_key,
    write_model,
)
from cachebind.analysis.sampling import sample_images
from cachebind.config import Settings
from cachebind.store import CacheTable, connect
from cachebind.store.table import vectors_to_numpy

STAGING_SCHEMA = pa.schema([*MAP_SCHEMA_FIELDS, pa.field("part", pa.int32(), nullable=False)])


@dataclass
class MapResult:
    name: str
    table_version: int
    method: str
    rows: int
    """Rows the map holds: the whole table version (0 while a stopped run is unfinished)."""
    placed: int
    """Rows this run placed (fewer when it resumed a stopped run)."""
    sample: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["seconds"] = round(self.seconds, 3)
        return out


def place_partition(
    uri: str,
    storage_options: dict[str, str] | None,
    version: int,
    part: int,
    partition_rows: int,
    projection: Projection,
    batch_rows: int,
) -> pa.Table:
    """The staged rows (id, x, y, part) of row range ``part`` of the pinned version; memory is
    one batch of vectors and the range's positions (16 bytes a row)."""
    import lance

    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    batches = dataset.to_batches(
        columns=["id", "vector"],
        offset=part * partition_rows,
        limit=partition_rows,
        batch_size=batch_rows,
        scan_in_order=True,
    )
    parts = []
    for batch in batches:
        xy = projection.transform(vectors_to_numpy(batch.column("vector")))
        parts.append(
            pa.table(
                [
                    batch.column("id"),
                    pa.array(xy[:, 0]),
                    pa.array(xy[:, 1]),
                    pa.array(np.full(batch.num_rows, part, dtype=np.int32)),
                ],
                schema=STAGING_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else STAGING_SCHEMA.empty_table()


@dataclass
class MapRun:
    """One map computation of a pinned table version: its model, its ranges, its staging."""

    settings: Settings
    table: CacheTable
    projection: Projection
    name: str
    model_name: str
    staging: Any
    """The LanceDB staging table."""
    staged: set[int]
    """Ranges already placed (by this run or a stopped one)."""
    sample: int
    started: float
    placed: int = 0

    @property
    def partition_rows(self) -> int:
        return self.settings.analysis.map_partition_rows

    def todo(self) -> list[int]:
        n = -(-self.table.count() // self.partition_rows)
        return [p for p in range(n) if p not in self.staged]

    def task_args(self, part: int, projection: Any = None) -> tuple[Any, ...]:
        """The arguments of :func:`place_partition` for range ``part`` (``projection``: the
        model in another form, such as a Ray object reference)."""
        return (
            str(self.table.dataset.uri),
            self.table.storage_options,
            self.table.version,
            part,
            self.partition_rows,
            self.projection if projection is None else projection,
            self.settings.analysis.batch_rows,
        )

    def stage(self, rows: pa.Table) -> int:
        """Append one placed range in one commit, unless it is staged already."""
        parts = set(pc.unique(rows["part"]).to_pylist()) if rows.num_rows else set()
        if len(parts) != 1:
            raise ValueError(f"a staged batch holds one range, not {sorted(parts)}")
        (part,) = parts
        if part in self.staged:
            return 0
        self.staging.add(rows)
        self.staged.add(part)
        self.placed += rows.num_rows
        return rows.num_rows

    def finish(self) -> MapResult:
        """Copy the staged ranges to the map in one commit; drop the staging tables and the
        models of other runs of this version."""
        cfg = self.settings.analysis
        total = self.table.count()
        staged = self.staging.to_lance()
        held = staged.count_rows()
        if held != total or self.todo():
            raise RuntimeError(
                f"the map of {self.name} holds {held} of {total} rows with ranges "
                f"{self.todo()} missing: run `cachebind map` again to finish it"
            )
        meta = {
            "method": self.projection.method,
            "table_version": self.table.version,
            "sample": self.sample,
            "seed": cfg.seed,
            "model": self.model_name,
        }
        schema = pa.schema(MAP_SCHEMA_FIELDS, metadata={METADATA_KEY: json.dumps(meta)})

        def copied() -> Iterator[pa.RecordBatch]:
            for batch in staged.to_batches(columns=["id", "x", "y"], batch_size=cfg.batch_rows):
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)

        db = connect(self.settings.store)
        reader = pa.RecordBatchReader.from_batches(schema, copied())
        db.create_table(self.name, reader, schema=schema, mode="overwrite")
        # Stopped runs of other settings are superseded by this map, and so are their models.
        for other in table_names(db):
            staging = other.startswith(f"{self.name}_part_")
            model = other.startswith(f"{self.name}_model_") and other != self.model_name
            if staging or model:
                db.drop_table(other, ignore_missing=True)
        seconds = time.perf_counter() - self.started
        return MapResult(
            self.name,
            self.table.version,
            self.projection.method,
            total,
            self.placed,
            self.sample,
            seconds,
        )


def start_map(settings: Settings, method: Literal["umap", "pca"] | None = None) -> MapRun:
    """Pin the table, fit the layout (or read back the one a stopped run stored) and open the
    staging table of this run."""
    started = time.perf_counter()
    cfg = settings.analysis
    method = method or cfg.map_method
    table = CacheTable.open(settings.store)
    name = map_table_name(settings.store.table, table.version)
    key = run_key(method, cfg.map_sample, cfg.seed, cfg.map_neighbours)
    model_name = model_table_name(name, key)
    # The range size is part of the staging table's name: range p means other rows under
    # another size, so a run with another size starts its own staging.
    staging_name = f"{name}_part_{key}_{cfg.map_partition_rows}"
    db = connect(settings.store)
    sample = min(cfg.map_sample, table.count())
    existing = set(table_names(db))
    projection = read_model(settings.store, model_name) if staging_name in existing else None
    if projection is None:
        # A fresh run: a staging table without its model cannot be resumed consistently.
        db.drop_table(staging_name, ignore_missing=True)
        _, vectors = sample_images(table, cfg.map_sample, cfg.seed)
        projection = fit_projection(vectors, method, cfg.map_neighbours, cfg.seed)
        write_model(settings.store, model_name, projection)
    try:
        staging = db.open_table(staging_name)
    except ValueError:
        staging = db.create_table(staging_name, schema=STAGING_SCHEMA, exist_ok=True)
    staged_parts = staging.to_lance().to_table(columns=["part"])["part"]
    staged = set(pc.unique(staged_parts).to_pylist())
    return MapRun(settings, table, projection, name, model_name, staging, staged, sample, started)


def compute_map(
    settings: Settings,
    method: Literal["umap", "pca"] | None = None,
    *,
    max_partitions: int | None = None,
) -> MapResult:
    """Place every row of the pinned table version in this process and store the map.
    ``max_partitions`` stops after that many ranges (the map is then left unfinished, for a
    later run, local or Ray, to complete)."""
    run = start_map(settings, method)
    todo = run.todo()
    for part in todo[:max_partitions] if max_partitions is not None else todo:
        run.stage(place_partition(*run.task_args(part)))
    if run.todo():
        return MapResult(
            run.name,
            run.table.version,
            run.projection.method,
            0,
            run.placed,
            run.sample,
            time.perf_counter() - run.started,
        )
    return run.finish()
