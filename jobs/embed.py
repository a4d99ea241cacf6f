"""The embedding job: sources -> decode + preprocess (CPU tasks) -> ImageBind vision encoder
(actors, one per GPU) -> the cache's LanceDB table.

    python -m jobs.embed SOURCE [--config FILE] [--address auto] [--limit N]
    ray job submit -- python jobs/embed.py SOURCE --config FILE

Dataflow (Ray Data, streaming)::

    partitions (one item each) --map_batches(decode_partition, tasks)--> rows with pixels
      --map_batches(EncodeActor, ActorPoolStrategy, num_gpus=1)--> rows with F_M = vector
      --iter_batches on the driver--> CacheWriter (rows, errors, progress)

Why the driver writes: each LanceDB ``add`` is one atomic commit and the writer drops ids it has
already committed, so a driver killed at any moment and started again with the same arguments
ends with every good sample exactly once. A partition is recorded as finished only after all of
its rows and errors are committed; an unfinished one is read again and its committed ids skipped
before decoding. Ray Data retries decode tasks whose worker died and restarts encoder actors
(``max_restarts=-1``, ``max_task_retries=-1``), so killing a worker process loses nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from cachebind.config import EmbedConfig, EncoderConfig, Settings, WeightsConfig, load_config
from cachebind.errors import InputError
from cachebind.sources import Partition, list_partitions, parse_source, read_partition
from cachebind.store import CacheWriter, images_schema, row_id

PIXELS = (3, 224, 224)

# Columns between the stages. ``status`` is "ok" (pixels to encode), "error" (goes to the errors
# table) or "done" (one marker per partition: ``count`` distinct ids were emitted for it).
STAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("pixels", pa.binary()),
        pa.field("thumbnail", pa.binary()),
        pa.field("count", pa.int64()),
        pa.field("decode_s", pa.float64()),
    ]
)


# -- resources ------------------------------------------------------------------------------


@dataclass
class Plan:
    """How the job uses the cluster: derived from ``ray.cluster_resources()``, overridable."""

    gpus: int
    cpus: int
    num_encoders: int
    encoder_cpus: float
    encoder_gpus: float
    batch_size: int
    num_readers: int
    pixel_dtype: str
    """float16 halves the transfer to GPU actors; CPU actors get float32 (exactly what a
    single-process loop would feed the model)."""
    chunk_rows: int
    """Rows per block out of a decode task: bounds a block to ~chunk_rows x 300 KB."""


def plan_resources(resources: dict[str, float], cfg: EmbedConfig) -> Plan:
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        num_encoders = cfg.num_encoders or gpus  # one actor per GPU of every box
        encoder_cpus, encoder_gpus = 1.0, 1.0
        batch_size = cfg.batch_size or 256
        pixel_dtype = "float16"
    else:
        num_encoders = cfg.num_encoders or 1
        # On a CPU box the encoder is the bottleneck: give it half the cores (its matmuls use
        # them all), the other half decode.
        encoder_cpus = float(max(1, cpus // (2 * num_encoders)))
        encoder_gpus = 0.0
        batch_size = cfg.batch_size or 32
        pixel_dtype = "float32"
    spare = max(1, cpus - int(encoder_cpus * num_encoders)) if not gpus else max(1, cpus - gpus)
    num_readers = cfg.num_readers or spare
    return Plan(
        gpus=gpus,
        cpus=cpus,
        num_encoders=num_encoders,
        encoder_cpus=encoder_cpus,
        encoder_gpus=encoder_gpus,
        batch_size=batch_size,
        num_readers=num_readers,
        pixel_dtype=pixel_dtype,
        chunk_rows=max(8, min(batch_size, 64)),
    )


# -- stage 1: read + decode + preprocess (CPU tasks) ----------------------------------------


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int
    max_bytes: int
    thumbnails: bool
    thumbnail_size: int
    pixel_dtype: str
    chunk_rows: int


def decode_partition(batch: pa.Table, *, options: DecodeOptions) -> Iterator[pa.Table]:
    """Read each partition of ``batch`` and yield blocks of decoded samples, then its marker.

    Bad samples become ``error`` rows (reason from ``InputError``) instead of exceptions, so a
    corrupt image never fails the task; ids in the partition's ``skip`` list (committed by an
    earlier run) are not decoded at all.
    """
    for item in batch.to_pylist():
        partition = Partition.from_dict(json.loads(item["partition"]))
        skip = set(json.loads(item["skip"]))
        rows: list[dict[str, Any]] = []
        emitted: set[int] = set()
        try:
            for sample in read_partition(partition):
                sid = row_id(sample.key)
                if sid in skip or sid in emitted:
                    continue
                emitted.add(sid)
                rows.append(decode_sample(sample, sid, partition.id, options))
                if len(rows) >= options.chunk_rows:
                    yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)
                    rows = []
        except Exception as exc:  # an unreadable shard must not stop the job
            key = f"{partition.id}#unreadable"
            sid = row_id(key)
            if sid not in emitted:
                emitted.add(sid)
                rows.append(
                    _error_row(sid, key, partition.id, "read", "unreadable", repr(exc), None)
                )
        marker = _empty_row(row_id(f"{partition.id}#done"), partition.id)
        rows.append({**marker, "status": "done", "count": len(emitted)})
        yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def decode_sample(sample: Any, sid: int, shard: str, options: DecodeOptions) -> dict[str, Any]:
    """One sample -> an ``ok`` row (pixels, size, thumbnail) or an ``error`` row."""
    from cachebind.preprocess.image import image_tensor, load_image

    start = time.perf_counter()
    base = {"caption": sample.caption, "url": sample.url}
    if sample.error is not None:
        reason, detail = sample.error
        return _error_row(sid, sample.key, shard, "read", reason, detail, base)
    try:
        img = load_image(
            sample.image, sample.key, max_pixels=options.max_pixels, max_bytes=options.max_bytes
        )
        pixels = image_tensor(img).numpy().astype(options.pixel_dtype, copy=False)
        thumb = thumbnail_jpeg(img, options.thumbnail_size) if options.thumbnails else None
    except InputError as exc:
        return _error_row(sid, sample.key, shard, "decode", exc.reason, exc.detail, base)
    except Exception as exc:  # a decoder bug on one odd file: record it, keep going
        return _error_row(sid, sample.key, shard, "decode", "undecodable", repr(exc), base)
    return {
        **_empty_row(sid, shard),
        **base,
        "key": sample.key,
        "status": "ok",
        "width": img.width,
        "height": img.height,
        "pixels": pixels.tobytes(),
        "thumbnail": thumb,
        "decode_s": time.perf_counter() - start,
    }


def thumbnail_jpeg(img: Any, size: int) -> bytes:
    """A JPEG whose longer side is at most ``size`` px (aspect ratio kept)."""
    from PIL import Image

    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _empty_row(sid: int, shard: str) -> dict[str, Any]:
    return {"id": sid, "key": "", "shard": shard, "count": 0, "decode_s": 0.0}


def _error_row(
    sid: int,
    key: str,
    shard: str,
    stage: str,
    reason: str,
    detail: str,
    base: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        **_empty_row(sid, shard),
        **(base or {}),
        "key": key,
        "status": "error",
        "stage": stage,
        "reason": reason,
        "detail": (detail or "")[:2000],
    }


# -- stage 2: encode (actors) ----------------------------------------------------------------


class EncodeActor:
    """Holds one Encoder (one GPU, or CPU threads) and turns pixels into F_M = vector."""

    def __init__(
        self,
        encoder_cfg: EncoderConfig,
        weights_cfg: WeightsConfig,
        pixel_dtype: str,
        captions: bool,
        threads: int,
    ) -> None:
        import torch

        from cachebind.encode import Encoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.encoder = Encoder.from_config(encoder_cfg, weights_cfg)
        self.pixel_dtype = pixel_dtype
        self.captions = captions

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch
        import torch.nn.functional as F

        from cachebind.modalities import Modality

        dim = self.encoder.out_dim
        n = batch.num_rows
        status = batch["status"].to_numpy(zero_copy_only=False)
        ok = np.flatnonzero(status == "ok")
        vectors = np.zeros((n, dim), dtype=np.float32)
        text_vectors = np.zeros((n, dim), dtype=np.float32)
        has_text = np.zeros(n, dtype=bool)
        encode_s = np.zeros(n, dtype=np.float64)
        if len(ok):
            start = time.perf_counter()
            pixels = batch["pixels"].take(pa.array(ok)).to_pylist()
            x = np.frombuffer(b"".join(pixels), dtype=self.pixel_dtype).reshape(-1, *PIXELS)
            feats = self.encoder.encode(Modality.IMAGE, torch.from_numpy(x.copy()))
            vectors[ok] = F.normalize(feats.float(), dim=-1).numpy()
            if self.captions:
                has_text = self._embed_captions(batch, ok, text_vectors)
            encode_s[ok] = (time.perf_counter() - start) / len(ok)
        out = batch.drop_columns(["pixels"])
        out = out.append_column("vector", _fixed_list(vectors))
        if self.captions:
            out = out.append_column("text_vector", _fixed_list(text_vectors, valid=has_text))
        return out.append_column("encode_s", pa.array(encode_s))

    def _embed_captions(self, batch: pa.Table, ok: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Caption embeddings (text encoder) into ``out``; returns which rows have one. A row
        without a usable caption gets a null ``text_vector``, never a failed batch."""
        from cachebind.modalities import Modality

        has_text = np.zeros(len(out), dtype=bool)
        captions = batch["caption"].to_pylist()
        rows = [int(i) for i in ok if captions[i] and captions[i].strip()]
        if not rows:
            return has_text
        try:
            out[rows] = self.encoder.embed(Modality.TEXT, [captions[i] for i in rows])
            has_text[rows] = True
        except InputError:  # one bad caption: embed one by one, skipping the bad ones
            for i in rows:
                try:
                    out[i] = self.encoder.embed(Modality.TEXT, [captions[i]])[0]
                    has_text[i] = True
                except InputError:
                    continue
        return has_text


def _fixed_list(values: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    mask = pa.array(~valid) if valid is not None else None
    return pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), values.shape[1], mask=mask
    )


# -- report ----------------------------------------------------------------------------------


@dataclass
class StageStats:
    samples: int = 0
    busy_s: float = 0.0
    """Seconds that workers of this stage spent on these samples (summed over workers)."""

    def as_dict(self, wall_s: float) -> dict[str, float]:
        return {
            "samples": self.samples,
            "busy_s": round(self.busy_s, 3),
            "samples_per_busy_s": round(self.samples / self.busy_s, 2) if self.busy_s else 0.0,
            "samples_per_wall_s": round(self.samples / wall_s, 2) if wall_s else 0.0,
        }


@dataclass
class EmbedReport:
    """What a run did; printed at the end and saved as JSON beside the table."""

    source: str
    uri: str
    table: str
    encoder: dict[str, Any]
    rows_written: int = 0
    rows_skipped: int = 0
    """Samples already in the table or errors table (earlier runs, repeated keys)."""
    errors_written: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    partitions_total: int = 0
    partitions_skipped: int = 0
    partitions_finished: int = 0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    steady_samples_per_s: float = 0.0
    """Throughput once the pipeline is flowing (first block to last): excludes Ray start-up,
    actor and model initialisation, which a long job amortises."""
    stopped_by_limit: bool = False
    started_at: str = ""
    finished_at: str = ""
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_reason.items())) or "-"
        stage_lines = "\n".join(
            f"  {name:<7} {s['samples']:>9} samples  {s['samples_per_busy_s']:>9.1f}/s per "
            f"worker  {s['samples_per_wall_s']:>9.1f}/s overall"
            for name, s in self.stages.items()
        )
        return (
            f"embed {self.source} -> {self.uri}/{self.table}\n"
            f"  rows written {self.rows_written}, skipped (already present) {self.rows_skipped}, "
            f"errors {self.errors_written} ({errors})\n"
            f"  partitions {self.partitions_finished} finished, {self.partitions_skipped} "
            f"skipped as done, of {self.partitions_total}\n"
            f"{stage_lines}\n"
            f"  wall {self.wall_s:.1f} s, {self.samples_per_s:.1f} samples/s "
            f"({self.steady_samples_per_s:.1f}/s once flowing)"
            + (" (stopped at --limit)" if self.stopped_by_limit else "")
        )


def save_report(report: EmbedReport, uri: str, table: str) -> str:
    """Write ``<uri>/<table>.report.json`` (latest) and ``<uri>/_reports/<table>-<time>.json``."""
    text = json.dumps(report.to_dict(), indent=2, default=str)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    latest = f"{uri.rstrip('/')}/{table}.report.json"
    fs, _ = fsspec.core.url_to_fs(latest)
    fs.makedirs(f"{uri.rstrip('/')}/_reports", exist_ok=True)
    for path in (f"{uri.rstrip('/')}/_reports/{table}-{stamp}.json", latest):
        with fsspec.open(path, "w") as f:
            f.write(text)
    return latest


# -- the driver ------------------------------------------------------------------------------


@dataclass
class _PartitionState:
    received: set[int] = field(default_factory=set)
    expected: int | None = None
    rows: int = 0
    errors: int = 0


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
    return images_schema(
        dtype=settings.store.vector_dtype,
        dim=encoder.out_dim,
        text_vector=settings.embed.caption_embeddings,
        thumbnail=settings.embed.thumbnails,
        metadata={
            "encoder": encoder.identity,
            "checkpoint": encoder.identity.get("weights"),
            "preprocess_version": str(PREPROCESS_VERSION),
            "pretrained": bool(encoder.pretrained),
            "source": source,
            "created_at": datetime.now(UTC).isoformat(),
        },
    )


def init_ray(cfg: EmbedConfig) -> bool:
    """Join ``cfg.ray_address`` or start a local Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    # Keep the operator's terminal for the progress bar and the report: Ray Data's INFO lines
    # go to its log files, and the accelerator-env opt-in silences a FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Workers of a local instance inherit this; see the fork-safety note below.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:lance is not fork-safe")
    os.environ.setdefault(
        "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml"))
    )
    with warnings.catch_warnings():
        # Ray starts its processes with fork+exec: lance's warnings about forking a process
        # that has used it concern children that keep running Python, not these.
        warnings.filterwarnings("ignore", message="lancedb fork support")
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **kwargs)
        else:
            # A local instance gets every core; workers import cachebind from this environment.
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    return True


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
    spec = parse_source(source)
    encoder = probe_encoder(settings.encoder, settings.weights)
    schema = table_schema(settings, encoder, str(spec))
    writer = CacheWriter(settings.store, schema)  # refuses another encoder's table
    partitions = list_partitions(spec)
    finished = writer.finished_partitions()
    todo = [p for p in partitions if finished.get(p.id) != p.fingerprint()]
    report = EmbedReport(
        source=str(spec),
        uri=settings.store.uri,
        table=settings.store.table,
        encoder=encoder.identity,
        partitions_total=len(partitions),
        partitions_skipped=len(partitions) - len(todo),
        started_at=datetime.fromtimestamp(started, UTC).isoformat(),
    )
    started_ray = init_ray(settings.embed)
    try:
        if todo:
            _run_pipeline(todo, settings, writer, report, limit, progress, flush_rows, flush_s)
    finally:
        if started_ray:
            ray.shutdown()
    if writer.commits > 64:
        writer.compact()
    report.wall_s = round(time.time() - started, 3)
    processed = report.rows_written + report.errors_written
    report.samples_per_s = round(processed / report.wall_s, 2) if report.wall_s else 0.0
    report.finished_at = datetime.now(UTC).isoformat()
    report.report_path = save_report(report, settings.store.uri, settings.store.table)
    if progress:
        print(report.summary(), file=sys.stderr)
    return report


def _run_pipeline(
    todo: list[Partition],
    settings: Settings,
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
    items = [
        {
            "partition": json.dumps(p.to_dict()),
            "skip": json.dumps(sorted(committed.get(p.id, ()))),
        }
        for p in todo
    ]
    decode_options = DecodeOptions(
        max_pixels=cfg.max_image_pixels,
        max_bytes=cfg.max_image_bytes,
        thumbnails=cfg.thumbnails,
        thumbnail_size=cfg.thumbnail_size,
        pixel_dtype=plan.pixel_dtype,
        chunk_rows=plan.chunk_rows,
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        decode_partition,
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
            "threads": int(plan.encoder_cpus),
        },
        compute=ActorPoolStrategy(min_size=1, max_size=plan.num_encoders)
        if not plan.gpus
        else ActorPoolStrategy(min_size=plan.num_encoders, max_size=plan.num_encoders),
        num_cpus=plan.encoder_cpus,
        num_gpus=plan.encoder_gpus or None,
        # A killed actor is restarted and its batch retried (Ray Data's defaults, made explicit).
        max_restarts=-1,
        max_task_retries=-1,
    )

    sizes = [p.options.get("num_samples") for p in todo]
    total = sum(sizes) if all(s is not None for s in sizes) else None
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    states: dict[str, _PartitionState] = {p.id: _PartitionState() for p in todo}
    by_id = {p.id: p for p in todo}
    sink = _Sink(writer, settings, report, states, by_id)
    last_flush = time.monotonic()
    processed = 0
    first_block: tuple[float, int] | None = None
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    try:
        for block in batches:
            processed += sink.take(block)
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
        report.steady_samples_per_s = round((processed - first_block[1]) / elapsed, 2)
    stages = {
        "decode": sink.decode,
        "encode": sink.encode,
        "write": sink.write,
    }
    wall = time.time() - datetime.fromisoformat(report.started_at).timestamp()
    report.stages = {name: s.as_dict(wall) for name, s in stages.items()}


class _Sink:
    """The driver's side: buffers the pipeline's output and commits it through the writer."""

    def __init__(
        self,
        writer: CacheWriter,
        settings: Settings,
        report: EmbedReport,
        states: dict[str, _PartitionState],
        partitions: dict[str, Partition],
    ) -> None:
        self.writer = writer
        self.report = report
        self.states = states
        self.partitions = partitions
        self.vector_dtype = np.dtype(settings.store.vector_dtype)
        self.captions = settings.embed.caption_embeddings
        self.thumbnails = settings.embed.thumbnails
        self.rows: list[pa.Table] = []
        self.errors: list[pa.Table] = []
        self.pending_rows = 0
        self.last_samples = 0
        self.decode = StageStats()
        self.encode = StageStats()
        self.write = StageStats()
        self.reasons: Counter[str] = Counter()

    def take(self, block: pa.Table) -> int:
        """Buffer one block; returns the number of samples (rows + errors) in it."""
        status = block["status"].to_numpy(zero_copy_only=False)
        shards = block["shard"].to_pylist()
        ids = block["id"].to_numpy()
        counts = block["count"].to_numpy()
        for i in np.flatnonzero(status == "done"):
            self.states[shards[i]].expected = int(counts[i])
        samples = np.flatnonzero(status != "done")
        for i in samples:
            self.states[shards[i]].received.add(int(ids[i]))
        ok = status == "ok"
        if ok.any():
            rows = block.filter(pa.array(ok))
            self.rows.append(self._image_rows(rows))
            self.pending_rows += rows.num_rows
            self.decode.samples += rows.num_rows
            self.decode.busy_s += float(pc_sum(rows["decode_s"]))
            self.encode.samples += rows.num_rows
            self.encode.busy_s += float(pc_sum(rows["encode_s"]))
        bad = status == "error"
        if bad.any():
            self.errors.append(
                block.filter(pa.array(bad)).select(
                    ["id", "key", "shard", "stage", "reason", "detail"]
                )
            )
        self.last_samples = len(samples)
        return len(samples)

    def _image_rows(self, rows: pa.Table) -> pa.Table:
        columns: dict[str, Any] = {
            name: rows[name] for name in ("id", "key", "caption", "url", "width", "height", "shard")
        }
        columns["vector"] = _as_dtype(rows["vector"], self.vector_dtype)
        if self.captions:
            columns["text_vector"] = _as_dtype(rows["text_vector"], self.vector_dtype)
        if self.thumbnails:
            columns["thumbnail"] = rows["thumbnail"]
        return pa.table(columns)

    def flush(self) -> None:
        """Commit buffered rows and errors, then record partitions that are now complete."""
        start = time.perf_counter()
        if self.rows:
            rows = pa.concat_tables(self.rows)
            result = self.writer.write_rows(rows)
            self.report.rows_written += result.written
            self.report.rows_skipped += result.skipped
            self.write.samples += rows.num_rows
            self._count(rows, "rows", result.written)
        if self.errors:
            errors = pa.concat_tables(self.errors)
            result = self.writer.write_errors(errors)
            self.report.errors_written += result.written
            self.report.rows_skipped += result.skipped
            if result.written:
                self.reasons.update(errors["reason"].to_pylist())
            self._count(errors, "errors", result.written)
        self.report.errors_by_reason = dict(self.reasons)
        self.rows, self.errors, self.pending_rows = [], [], 0
        # Everything received so far is committed: complete partitions can be recorded.
        done = [
            pid
            for pid, s in self.states.items()
            if s.expected is not None and len(s.received) >= s.expected
        ]
        if done:
            self.writer.finish_partitions(
                [
                    {
                        "partition": pid,
                        "fingerprint": self.partitions[pid].fingerprint(),
                        "source": self.report.source,
                        "rows": self.states[pid].rows,
                        "errors": self.states[pid].errors,
                    }
                    for pid in done
                ]
            )
            for pid in done:
                del self.states[pid]
            self.report.partitions_finished += len(done)
        self.write.busy_s += time.perf_counter() - start

    def _count(self, table: pa.Table, what: str, written: int) -> None:
        if not written:
            return
        for shard, n in Counter(table["shard"].to_pylist()).items():
            if shard in self.states:
                setattr(self.states[shard], what, getattr(self.states[shard], what) + n)


def pc_sum(column: pa.ChunkedArray) -> float:
    import pyarrow.compute as pc

    value = pc.sum(column).as_py()
    return float(value or 0.0)


def _as_dtype(column: pa.ChunkedArray, dtype: np.dtype) -> pa.FixedSizeListArray:
    """A vector column in the table's dtype, null entries (rows without a caption) kept."""
    column = column.combine_chunks()
    dim = column.type.list_size
    # .values keeps the slots of null entries (flatten would drop them).
    start = column.offset * dim
    values = column.values.slice(start, len(column) * dim)
    values = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    mask = column.is_null() if column.null_count else None
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim, mask=mask)


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed",
        description="Embed a source's images with ImageBind into the cache's LanceDB table.",
    )
    parser.add_argument(
        "source",
        help="webdataset:/data/{00000..00331}.tar, a folder, a .parquet or cc3m:X.tsv?images=DIR",
    )
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--address", help="Ray cluster address (auto, ray://host:10001)")
    parser.add_argument("--limit", type=int, help="stop after this many samples")
    parser.add_argument("--uri", help="LanceDB database (overrides store.uri)")
    parser.add_argument("--table", help="table name (overrides store.table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--flush-rows", type=int, default=1024, help="commit every N rows (default 1024)"
    )
    args = parser.parse_args(argv)
    settings = load_config(
        args.config,
        embed={"ray_address": args.address},
        store={"uri": args.uri, "table": args.table},
    )
    report = run_embed(
        args.source,
        settings,
        limit=args.limit,
        progress=not args.no_progress,
        flush_rows=args.flush_rows,
    )
    print(json.dumps({"report": report.report_path, "rows_written": report.rows_written}))
    return 0


if __name__ == "__main__":
    # Run as a script (``ray job submit -- python jobs/embed.py``): use the importable module's
    # functions so that Ray ships references to ``jobs.embed``, not copies of ``__main__``.
    from jobs.embed import main as _main

    sys.exit(_main())
