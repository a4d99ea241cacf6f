"""The embedding job: sources -> decode + preprocess (CPU tasks) -> ImageBind vision encoder
(actors, one per GPU) -> the cache's LanceDB table.

    python -m jobs.embed SOURCE [--config FILE] [--address auto] [--limit N]
    ray job submit --working-dir . -- python -m jobs.embed SOURCE --config FILE

Dataflow (Ray Data, streaming)::

    partitions (one item each) --map_batches(decode_partition, tasks)--> rows with pixels
      --map_batches(EncodeActor, ActorPoolStrategy, num_gpus=1)--> rows with F_M = vector,
        written by the actor as Lance fragments at the table location (embed.sink = "workers")
      --iter_batches on the driver--> fragment descriptors, errors, partition markers
      --> CacheWriter (commits fragments, errors, progress)

With ``embed.sink = "driver"`` the rows themselves travel to the driver, which appends them.
Either way the driver commits: each commit is atomic, and the driver never commits an id it
has already committed (:mod:`jobs.embed.sink` says why that holds for fragments written by
retried tasks), so a driver killed at any moment and started again with the same arguments
ends with every good sample exactly once. A partition is recorded as finished only after all of
its rows and errors are committed; an unfinished one is read again and its committed ids skipped
before decoding. Ray Data retries decode tasks whose worker died and restarts encoder actors
(``max_restarts=-1``, ``max_task_retries=-1``), so killing a worker process loses nothing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from cachebind.config import EncoderConfig, Settings, WeightsConfig
from cachebind.sources import Partition, StorageOptions, list_partitions, parse_source
from cachebind.store import CacheWriter, images_schema
from jobs.embed.decode import DecodeOptions, decode_partition
from jobs.embed.encode import EncodeActor
from jobs.embed.fragments import target_for
from jobs.embed.plan import init_ray, plan_resources
from jobs.embed.report import EmbedReport, save_report
from jobs.embed.shared import check_table_shared
from jobs.embed.sink import PartitionState, Sink

COMPACT_ABOVE = 64
"""Compact the table after a job that left more fragments (or commits) than this."""

STEADY_MIN_BLOCKS = 4
STEADY_MIN_SECONDS = 1.0
"""A steady rate needs this many blocks after the first, over at least this long."""


def probe_encoder(encoder_cfg: EncoderConfig, weights_cfg: WeightsConfig) -> Any:
    """The encoder's identity and out_dim without allocating its weights (meta device)."""
    from cachebind.encode import Encoder

    return Encoder.from_config(encoder_cfg.model_copy(update={"device": "meta"}), weights_cfg)


def table_schema(settings: Settings, encoder: Any, source: str) -> pa.Schema:
    """``images_schema`` with the encoder identity and preprocessing version as metadata."""
    try:
        from cachebind.preprocess import PREPROCESS_VERSION
    except ImportError:  # pragma: no cover - preprocess always ships it
        PREPROCESS_VERSION = encoder.identity.get("preprocess_version")
    views: dict[str, Any] = {}
    if settings.embed.views:
        from cachebind.preprocess.views import augmentation

        recorded = augmentation(settings.embed.view_set)
        views = {"views": {"count": settings.embed.views, "augmentation": recorded}}
    tokens: dict[str, Any] = {}
    if settings.embed.tokens:
        encoder.model.token_state(settings.embed.tokens_layer)  # refused before any work
        patches, width = encoder.model.vision_token_shape()
        tokens = {
            "tokens": {
                "layer": settings.embed.tokens_layer,
                "patches": patches,
                "width": width,
                "dtype": "float16",
                "cls": False,
            }
        }
    extra, extra_meta = extra_columns(settings)
    return images_schema(
        dtype=settings.store.vector_dtype,
        dim=encoder.out_dim,
        text_vector=settings.embed.caption_embeddings,
        thumbnail=settings.embed.thumbnails,
        views=settings.embed.views,
        tokens=patches * width if tokens else 0,
        extra=extra,
        metadata={
            **views,
            **tokens,
            **extra_meta,
            "encoder": encoder.identity,
            "checkpoint": encoder.identity.get("weights"),
            "preprocess_version": str(PREPROCESS_VERSION),
            "pretrained": bool(encoder.pretrained),
            "source": source,
            "created_at": datetime.now(UTC).isoformat(),
        },
    )


def extra_columns(settings: Settings) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """``embed.extra_encoders``' columns ({name: (dim, token values)}) and what the table
    records of them: ``extra_encoders`` (identities and token shapes, compared on append) and
    ``extra_checkpoints`` (their directories here, not compared). Each checkpoint is loaded
    once here, so that a bad one (a missing tensor, a token layer it lacks) is refused by
    name before any work rather than by every encoder actor Ray restarts."""
    if not settings.embed.extra_encoders:
        return {}, {}  # and transformers (seconds of imports) is not imported for nothing
    from cachebind.encode.extra import ExtraEncoder, extra_identity, extra_shape, read_config
    from cachebind.errors import WeightsError

    columns: dict[str, tuple[int, int]] = {}
    identities: dict[str, Any] = {}
    checkpoints: dict[str, str] = {}
    for name, directory in sorted(settings.embed.extra_encoders.items()):
        if not directory.is_dir():
            raise WeightsError(f"{name}: {directory} is not a checkpoint directory")
        config = read_config(name, directory)
        del ExtraEncoder.load(name, directory, "cpu").model  # refused here if it is bad
        shape = extra_shape(name, config)
        identity = extra_identity(name, directory, config)
        values = 0
        if settings.embed.tokens:
            shape.token_state(settings.embed.tokens_layer, name)
            values = shape.patches * shape.width
            identity["tokens"] = {
                "layer": settings.embed.tokens_layer,
                "patches": shape.patches,
                "width": shape.width,
                "dtype": "float16",
                "cls": False,
            }
        columns[name] = (shape.out_dim, values)
        identities[name] = identity
        checkpoints[name] = str(directory.resolve())
    if not columns:
        return {}, {}
    return columns, {"extra_encoders": identities, "extra_checkpoints": checkpoints}


def run_embed(
    source: str,
    settings: Settings,
    *,
    limit: int | None = None,
    progress: bool = True,
    flush_rows: int = 1024,
    flush_s: float = 10.0,
) -> EmbedReport:
    """Embed every sample of ``source`` into ``settings.store``'s table; resumable, idempotent.

    ``limit`` stops after that many samples (rows + errors) were committed; a later run with the
    same arguments carries on. Rows are committed every ``flush_rows`` rows or ``flush_s``
    seconds, whichever comes first. Raises ``EncoderMismatchError`` when the table was built by
    another encoder.
    """
    import ray

    started = time.time()
    # One set of S3 options (store.s3) serves the sources and the table.
    storage = StorageOptions.from_s3(settings.store.s3)
    spec = parse_source(source, storage)
    encoder = probe_encoder(settings.encoder, settings.weights)
    schema = table_schema(settings, encoder, str(spec))
    writer = CacheWriter(settings.store, schema)  # refuses another encoder's table
    partitions = list_partitions(spec, storage)
    finished = writer.finished_partitions()
    todo = [p for p in partitions if finished.get(p.id) != p.fingerprint()]
    report = EmbedReport(
        source=str(spec),
        uri=settings.store.uri,
        table=settings.store.table,
        encoder=encoder.identity,
        partitions_total=len(partitions),
        non_samples=sum(p.non_samples for p in partitions),
        partitions_skipped=len(partitions) - len(todo),
        started_at=datetime.fromtimestamp(started, UTC).isoformat(),
    )
    started_ray = init_ray(settings.embed)
    try:
        report.sink = settings.embed.sink
        if todo:
            if settings.embed.sink == "workers":
                report.nodes = check_table_shared(settings.store.uri)  # before any work
            _run_pipeline(
                todo, settings, storage, writer, report, limit, progress, flush_rows, flush_s
            )
    finally:
        if started_ray:
            ray.shutdown()
    if writer.commits > COMPACT_ABOVE or writer.fragment_count() > COMPACT_ABOVE:
        writer.compact()
    if todo:
        import indexing

        # The job's tasks are over: fragments never committed are garbage now (orphans).
        report.gc = indexing.collect(settings, orphans=True).to_dict()
    report.wall_s = round(time.time() - started, 3)
    processed = report.rows_written + report.errors_written
    report.samples_per_s = round(processed / report.wall_s, 2) if report.wall_s else 0.0
    report.finished_at = datetime.now(UTC).isoformat()
    report.report_path = save_report(report, settings.store)
    if progress:
        print(report.summary(), file=sys.stderr)
    return report


def _run_pipeline(
    todo: list[Partition],
    settings: Settings,
    storage: StorageOptions,
    writer: CacheWriter,
    report: EmbedReport,
    limit: int | None,
    progress: bool,
    flush_rows: int,
    flush_s: float,
) -> None:
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    cfg = settings.embed
    plan = plan_resources(ray.cluster_resources(), cfg)
    report.plan = asdict(plan)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below shows samples/s, ETA and errors
    ctx.execution_options.preserve_order = False

    # Partitions an earlier run started but did not finish: skip what it committed.
    committed = writer.committed_by_shard({p.id for p in todo})
    # Never decoded again, so the sink never sees them: count them here for the report.
    report.rows_skipped += sum(len(committed.get(p.id, ())) for p in todo)
    items = [
        {
            "partition": json.dumps(p.to_dict()),
            "skip": json.dumps(sorted(committed.get(p.id, ()))),
        }
        for p in todo
    ]
    decode_options = DecodeOptions(
        max_pixels=cfg.max_image_pixels or settings.input.max_image_pixels,
        max_bytes=cfg.max_image_bytes or settings.input.max_bytes,
        max_group_bytes=cfg.max_row_group_bytes,
        thumbnails=cfg.thumbnails,
        thumbnail_size=cfg.thumbnail_size,
        pixel_dtype=plan.pixel_dtype,
        chunk_rows=plan.chunk_rows,
        storage=storage,
        # Each decode task decodes through one sandbox worker: the task is the unit of
        # parallelism, the worker its isolation.
        sandbox=settings.sandbox.model_copy(update={"workers": 1}),
        limits=settings.input,
        views=cfg.views,
        view_set=cfg.view_set,
        extra=tuple(sorted(cfg.extra_encoders)),
    )
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        # Ray's annotations leave out fn_kwargs: its callables take the batch alone.
        decode_partition,  # type: ignore[arg-type]
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"options": decode_options},
        compute=TaskPoolStrategy(size=plan.num_readers),
        num_cpus=1,
    )
    ds = ds.map_batches(
        EncodeActor,
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "encoder_cfg": settings.encoder,
            "weights_cfg": settings.weights,
            "pixel_dtype": plan.pixel_dtype,
            "captions": cfg.caption_embeddings,
            "views": cfg.views,
            "tokens_layer": cfg.tokens_layer if cfg.tokens else None,
            "extra": {name: str(path) for name, path in cfg.extra_encoders.items()},
            "threads": int(plan.encoder_cpus),
            "target": target_for(settings, writer),
        },
        # On a CPU box the pool grows with the queue, unless a number of encoders was asked.
        compute=ActorPoolStrategy(min_size=1, max_size=plan.num_encoders)
        if not plan.gpus and not cfg.num_encoders
        else ActorPoolStrategy(min_size=plan.num_encoders, max_size=plan.num_encoders),
        num_cpus=plan.encoder_cpus,
        num_gpus=plan.encoder_gpus or None,
        # A killed actor is restarted and its batch retried (Ray Data's defaults, made explicit).
        max_restarts=-1,
        max_task_retries=-1,
    )

    sizes = [p.options.get("num_samples") for p in todo]
    known_sizes = [s for s in sizes if s is not None]
    total = sum(known_sizes) if len(known_sizes) == len(sizes) else None
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    states: dict[str, PartitionState] = {p.id: PartitionState() for p in todo}
    by_id = {p.id: p for p in todo}
    sink = Sink(writer, settings, report, states, by_id)
    last_flush = time.monotonic()
    processed = 0
    first_block: tuple[float, int] | None = None
    blocks = 0
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    try:
        for block in batches:
            processed += sink.take(block)
            blocks += 1
            if first_block is None and processed:
                first_block = (time.monotonic(), processed)
            bar.update(sink.last_samples)
            if sink.pending_rows >= flush_rows or time.monotonic() - last_flush >= flush_s:
                sink.flush()
                last_flush = time.monotonic()
                bar.set_postfix(
                    errors=report.errors_written,
                    parts=f"{report.partitions_finished}/{len(todo)}",
                )
            if limit is not None and processed >= limit:
                report.stopped_by_limit = True
                break
        sink.flush()
    finally:
        bar.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if first_block is not None and processed > first_block[1]:
        elapsed = time.monotonic() - first_block[0]
        # A short job's later blocks are often already prefetched when the first one lands, so
        # a rate over a few blocks or under a second measures the buffer, not the pipeline.
        if blocks > STEADY_MIN_BLOCKS and elapsed >= STEADY_MIN_SECONDS:
            report.steady_samples_per_s = round((processed - first_block[1]) / elapsed, 2)
    report.driver_bytes_received = sink.bytes_received
    if sink.ledger is not None:
        report.fragments = {
            "committed": sink.ledger.committed,
            "rewritten": sink.ledger.rewritten,
            "dropped": sink.ledger.dropped,
        }
    stages = {
        "decode": sink.decode,
        "encode": sink.encode,
        "write": sink.write,
    }
    wall = time.time() - datetime.fromisoformat(report.started_at).timestamp()
    report.stages = {name: s.as_dict(wall) for name, s in stages.items()}
