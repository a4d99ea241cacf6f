"""Embedding job throughput.

CPU mode (always): the Ray job's samples/s with the tiny encoder against a plain single-process
loop doing the same work (read, decode, preprocess, thumbnail, encode, write) on the same shards.
GPU mode (when a GPU is present): ImageBind-huge with random weights, end-to-end job images/s
against the encoder alone, and what that means for CC3M's 3.3M images.

Sinks mode: the same job with the driver sink and with the distributed sink (encoder actors
write Lance fragments) on the same shards: bytes the driver received per row, images/s, and
the table directory's size after the job (and its gc) against its live data.

Views mode: the same job with ``embed.views`` 0 and N (``--views``, default 2) on the same
shards: images/s and the table's live bytes per row.

    python benchmarks/bench_embed.py [--n 1000] [--mode auto|cpu|gpu|sinks|views] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from cachebind.config import EmbedConfig, EncoderConfig, Settings, StoreConfig
from cachebind.encode import Encoder
from cachebind.modalities import Modality
from cachebind.preprocess.image import image_tensor, load_image
from cachebind.sources import list_partitions, read_partition
from cachebind.sources import synthetic as syn
from cachebind.store import CacheWriter, row_id
from jobs.embed import probe_encoder, run_embed, table_schema, thumbnail_jpeg

CC3M_IMAGES = 3_318_333


def make_shards(root: Path, n: int, per_shard: int) -> Path:
    """img2dataset-like shards of 256 x 192 JPEGs (img2dataset's usual resize is 256)."""
    import io
    import tarfile

    out = root / "shards"
    out.mkdir(parents=True)
    for shard in range((n + per_shard - 1) // per_shard):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for pos in range(min(per_shard, n - shard * per_shard)):
                i = shard * per_shard + pos
                key = f"{shard * 10_000 + pos:09d}"
                for name, data in (
                    (f"{key}.jpg", syn.image_bytes(i, (256, 192))),
                    (f"{key}.txt", f"caption {i}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def plain_loop(source: str, settings: Settings, batch_size: int) -> tuple[int, float]:
    """The same work without Ray: one process, one sample after another, batched encode."""
    start = time.perf_counter()
    encoder = Encoder.from_config(settings.encoder, settings.weights)
    schema = table_schema(settings, probe_encoder(settings.encoder, settings.weights), source)
    writer = CacheWriter(settings.store, schema)
    written = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal written, pending
        if not pending:
            return
        x = torch.stack([p.pop("pixels") for p in pending])
        vectors = F.normalize(encoder.encode(Modality.IMAGE, x), dim=-1).numpy()
        values = pa.array(vectors.astype(settings.store.vector_dtype).reshape(-1))
        table = pa.Table.from_pylist(pending).append_column(
            "vector", pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
        )
        written += writer.write_rows(table.select(schema.names)).written
        pending = []

    for partition in list_partitions(source):
        for sample in read_partition(partition):
            img = load_image(sample.image, sample.key)
            pending.append(
                {
                    "id": row_id(sample.key),
                    "key": sample.key,
                    "caption": sample.caption,
                    "url": sample.url,
                    "width": img.width,
                    "height": img.height,
                    "shard": partition.id,
                    "thumbnail": thumbnail_jpeg(img, settings.embed.thumbnail_size),
                    "pixels": image_tensor(img),
                }
            )
            if len(pending) >= batch_size:
                flush()
    flush()
    return written, time.perf_counter() - start


def bench_cpu(n: int, work: Path) -> dict[str, Any]:
    source = str(make_shards(work, n, per_shard=100))
    batch = 32

    def settings(table: str) -> Settings:
        return Settings(
            encoder=EncoderConfig(preset="tiny", device="cpu"),
            store=StoreConfig(uri=str(work / "db"), table=table),
            embed=EmbedConfig(batch_size=batch),
        )

    # The baseline gets its best thread count (one thread wins on a busy machine, where torch's
    # OpenMP threads wait on each other), so the ratio is not flattered by a weak baseline.
    cores = torch.get_num_threads()
    loop_runs = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        loop_runs[threads] = plain_loop(source, settings(f"loop{threads}"), batch)
    torch.set_num_threads(cores)
    best = min(loop_runs, key=lambda t: loop_runs[t][1])
    loop_rows, loop_s = loop_runs[best]
    report = run_embed(source, settings("job"), progress=False)
    assert report.rows_written == loop_rows == n
    job_rate, loop_rate = n / report.wall_s, n / loop_s
    return {
        "mode": "cpu",
        "images": n,
        "cores": cores,
        "loop_s_by_threads": {t: round(r[1], 2) for t, r in loop_runs.items()},
        "loop_s": round(loop_s, 2),
        "loop_images_per_s": round(loop_rate, 1),
        "job_s": report.wall_s,
        "job_images_per_s": round(job_rate, 1),
        "job_over_loop": round(job_rate / loop_rate, 3),
        "job_steady_images_per_s": report.steady_samples_per_s,
        "job_steady_over_loop": round(report.steady_samples_per_s / loop_rate, 3),
        "job_stages": report.stages,
        "job_plan": report.plan,
    }


def job_round(source: str, db: Path, work: Path, n: int, **embed: Any) -> Any:
    """One embedding job of the tiny encoder into ``db`` (batch 32, ``embed`` overrides); every
    one of the ``n`` images must be written."""
    settings = Settings(
        encoder=EncoderConfig(preset="tiny", device="cpu"),
        store=StoreConfig(uri=str(db)),
        embed=EmbedConfig(batch_size=32, **embed),
        index={"dir": str(work / "index")},
    )
    report = run_embed(source, settings, progress=False)
    assert report.rows_written == n
    return report


def bench_sinks(n: int, work: Path, rounds: int = 1) -> dict[str, Any]:
    """Driver sink vs distributed sink on the same shards, alternating, ``rounds`` each."""
    source = str(make_shards(work, n, per_shard=100))
    runs: dict[str, list[dict[str, Any]]] = {"driver": [], "workers": []}
    for r in range(rounds):
        for sink in ("driver", "workers"):
            db = work / f"db-{sink}-{r}"
            report = job_round(source, db, work, n, sink=sink)
            images = report.gc["tables"]["images"]
            runs[sink].append(
                {
                    "wall_s": report.wall_s,
                    "images_per_s": report.samples_per_s,
                    "steady_images_per_s": report.steady_samples_per_s,
                    "driver_bytes_per_row": round(report.driver_bytes_received / n, 1),
                    "table_disk_mb": round(images["disk_bytes"] / 1e6, 2),
                    "table_live_mb": round(images["live_bytes"] / 1e6, 2),
                    "disk_over_live": round(images["disk_bytes"] / images["live_bytes"], 3),
                    "gc_freed_mb": round(report.gc["bytes_freed"] / 1e6, 2),
                    "fragments": report.fragments,
                }
            )
            shutil.rmtree(db, ignore_errors=True)
    return {"mode": "sinks", "images": n, "rounds": rounds, "runs": runs}


def bench_views(n: int, work: Path, rounds: int = 1, views: tuple[int, ...] = (0, 2)) -> dict:
    """``embed --views N``: the same job on the same shards with 0 and N augmented views,
    alternating, ``rounds`` each: images/s and the table's live bytes per row."""
    source = str(make_shards(work, n, per_shard=100))
    runs: dict[int, list[dict[str, Any]]] = {v: [] for v in views}
    for r in range(rounds):
        for v in views:
            db = work / f"db-views{v}-{r}"
            report = job_round(source, db, work, n, views=v)
            live = report.gc["tables"]["images"]["live_bytes"]
            runs[v].append(
                {
                    "wall_s": report.wall_s,
                    "images_per_s": report.samples_per_s,
                    "steady_images_per_s": report.steady_samples_per_s,
                    "table_live_bytes_per_row": round(live / n),
                    "decode_busy_s": report.stages["decode"]["busy_s"],
                    "encode_busy_s": report.stages["encode"]["busy_s"],
                }
            )
            shutil.rmtree(db, ignore_errors=True)
    return {"mode": "views", "images": n, "rounds": rounds, "runs": runs}


def bench_decode(n: int, work: Path, rounds: int = 3) -> dict[str, Any]:
    """The decode stage alone, in this process: ``decode_partition`` as the job runs it (samples
    decoded in a sandbox worker, a chunk per sandbox task) against the same function with the
    sandbox taken out (``decode_samples`` called in-process on each chunk). Rounds alternate so
    that a busy machine slows both alike; best of each."""
    import jobs.embed.decode as decode
    from jobs.embed.sample import decode_samples

    source = str(make_shards(work, n, per_shard=1000))
    partitions = list_partitions(source)
    options = decode.DecodeOptions(
        max_pixels=89_478_485,
        max_bytes=64 << 20,
        thumbnails=True,
        thumbnail_size=256,
        pixel_dtype="float32",
        chunk_rows=32,
    )
    items = pa.table(
        {
            "partition": [json.dumps(p.to_dict()) for p in partitions],
            "skip": ["[]"] * len(partitions),
        }
    )
    isolated = decode.decode_isolated

    def run(isolate: bool) -> float:
        # One thread, as a Ray task of num_cpus=1 (Ray sets OMP_NUM_THREADS) and the worker have.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        decode.decode_isolated = isolated if isolate else decode_samples
        try:
            start = time.perf_counter()
            rows = sum(b.num_rows for b in decode.decode_partition(items, options=options))
            elapsed = time.perf_counter() - start
        finally:
            decode.decode_isolated = isolated
            torch.set_num_threads(threads)
        assert rows == n + len(partitions)  # the samples and one marker per partition
        return elapsed

    run(True)  # starts the sandbox worker (imports torch once); a long job pays it once
    times: dict[str, list[float]] = {"sandbox": [], "in_process": []}
    for _ in range(rounds):
        times["sandbox"].append(run(True))
        times["in_process"].append(run(False))
    best = {k: min(v) for k, v in times.items()}
    return {
        "mode": "decode",
        "images": n,
        "sandbox_images_per_s": round(n / best["sandbox"], 1),
        "in_process_images_per_s": round(n / best["in_process"], 1),
        "sandbox_cost": round(best["sandbox"] / best["in_process"] - 1, 3),
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
    }


def bench_gpu(n: int, work: Path) -> dict[str, Any]:
    """ImageBind-huge (random weights) on every GPU: encoder alone vs the whole job."""
    encoder = Encoder.from_config(EncoderConfig(preset="huge"), Settings().weights)
    batch = 256
    x = torch.randn(batch, 3, 224, 224)
    encoder.encode(Modality.IMAGE, x[:8])  # warm-up (kernels, autotuning)
    torch.cuda.synchronize()
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        encoder.encode(Modality.IMAGE, x)
    torch.cuda.synchronize()
    encoder_rate = steps * batch / (time.perf_counter() - start)
    del encoder
    torch.cuda.empty_cache()

    source = str(make_shards(work, n, per_shard=1000))
    settings = Settings(
        encoder=EncoderConfig(preset="huge"),
        store=StoreConfig(uri=str(work / "db"), table="gpu"),
        embed=EmbedConfig(batch_size=batch),
    )
    report = run_embed(source, settings, progress=False)
    job_rate = report.rows_written / report.wall_s
    steady = report.stages["encode"]["samples_per_wall_s"]
    return {
        "mode": "gpu",
        "gpus": torch.cuda.device_count(),
        "device": torch.cuda.get_device_name(0),
        "images": n,
        "encoder_only_images_per_s_per_gpu": round(encoder_rate, 1),
        "job_images_per_s": round(job_rate, 1),
        "job_steady_images_per_s": report.steady_samples_per_s,
        "job_over_encoder": round(job_rate / (encoder_rate * torch.cuda.device_count()), 3),
        "cc3m_hours_at_job_rate": round(CC3M_IMAGES / job_rate / 3600, 2),
        "cc3m_hours_at_steady_rate": round(
            CC3M_IMAGES / max(report.steady_samples_per_s, 1e-9) / 3600, 2
        ),
        "cc3m_hours_at_encoder_rate": round(
            CC3M_IMAGES / (encoder_rate * torch.cuda.device_count()) / 3600, 2
        ),
        "job_stages": report.stages,
        "job_encode_samples_per_wall_s": steady,
        "job_plan": report.plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images")
    parser.add_argument("--mode", choices=["auto", "cpu", "gpu", "sinks", "views"], default="auto")
    parser.add_argument("--rounds", type=int, default=1, help="sinks/views: runs of each")
    parser.add_argument("--views", type=int, default=2, help="views mode: N against 0")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        if args.mode in ("auto", "cpu"):
            results.append(bench_cpu(args.n, work / "cpu"))
            results.append(bench_decode(args.n, work / "decode"))
        if args.mode == "sinks":
            results.append(bench_sinks(args.n, work / "sinks", args.rounds))
        if args.mode == "views":
            results.append(bench_views(args.n, work / "views", args.rounds, (0, args.views)))
        if args.mode == "gpu" or (args.mode == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise SystemExit("--mode gpu needs a GPU")
            results.append(bench_gpu(max(args.n, 5000), work / "gpu"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        if r["mode"] == "sinks":
            for sink, runs in r["runs"].items():
                for run in runs:
                    print(
                        f"{sink:>7} sink, {r['images']} images: {run['images_per_s']}/s "
                        f"({run['steady_images_per_s']}/s once flowing), driver received "
                        f"{run['driver_bytes_per_row']} B/row, table {run['table_disk_mb']} MB "
                        f"on disk for {run['table_live_mb']} MB live ({run['disk_over_live']}x)"
                    )
        elif r["mode"] == "views":
            for v, runs in r["runs"].items():
                for run in runs:
                    print(
                        f"views={v}, {r['images']} images: {run['images_per_s']}/s "
                        f"({run['steady_images_per_s']}/s once flowing), table "
                        f"{run['table_live_bytes_per_row']} B/row live; busy decode "
                        f"{run['decode_busy_s']} s, encode {run['encode_busy_s']} s"
                    )
        elif r["mode"] == "decode":
            print(
                f"decode stage, {r['images']} images: in a sandbox worker "
                f"{r['sandbox_images_per_s']}/s vs in-process {r['in_process_images_per_s']}/s "
                f"(isolation costs {100 * r['sandbox_cost']:.1f} %)"
            )
        elif r["mode"] == "cpu":
            print(
                f"CPU, tiny encoder, {r['images']} images: job {r['job_images_per_s']}/s "
                f"({r['job_s']} s incl. Ray start) vs single-process loop "
                f"{r['loop_images_per_s']}/s ({r['loop_s']} s): ratio {r['job_over_loop']}; "
                f"once flowing {r['job_steady_images_per_s']}/s, ratio "
                f"{r['job_steady_over_loop']}"
            )
        else:
            print(
                f"GPU x{r['gpus']} ({r['device']}), huge: encoder alone "
                f"{r['encoder_only_images_per_s_per_gpu']}/s per GPU, job "
                f"{r['job_images_per_s']}/s end to end; CC3M (3.3M) in "
                f"{r['cc3m_hours_at_job_rate']} h at the job's rate, "
                f"{r['cc3m_hours_at_steady_rate']} h once flowing "
                f"({r['cc3m_hours_at_encoder_rate']} h encoder-bound)"
            )
    print(json.dumps(results, indent=2, default=float))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
