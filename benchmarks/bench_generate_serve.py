"""``bench_generate.py --serve``: generation as a serving workload, in-flight batching against
the serial executor the service used before (one ``Generator.stream`` at a time in a one-thread
pool), in the same run on the same model.

For each number of concurrent streams, that many client threads submit one greedy request
each (``--tokens`` tokens, EOS ignored, different prompts, one visual query each); reported are
the aggregate tokens/s (all tokens / wall time) and p50 / p99 time to first token. Also: the
per-token decode time of one stream on the main thread, in a one-thread pool, and on the
scheduler's thread (does decoding off the main thread cost anything?).

CPU: the small LLaMA (``build_tiny_llm``, dim 512, 8 layers by default), fp32. GPU (``--gpu``):
LLaMA-7B-shaped random fp16 weights with the adapter; the tiny tokenizer is reused with ids
folded into its vocabulary for decoding (the model's 32000 logits are all computed and sampled).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cachebind.inject import Generator, build_tiny_llm
from cachebind.inject.scheduler import Scheduler

PROMPTS = [
    "Describe the image.",
    "What is in this picture?",
    "Two dogs are playing near the river: what else is there?",
    "Describe the sound.",
]


class FoldedTokenizer:
    """The tiny tokenizer for a 32000-word model: ids decode modulo its vocabulary."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.bos_id, self.eos_id, self.pad_id = inner.bos_id, inner.eos_id, inner.pad_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.inner.encode(text, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode([i % self.inner.n_words for i in ids])


def gpu_generator(workdir: Path, cfg=None, device: str = "cuda") -> Generator:
    """LLaMA-7B + released 7B adapter shapes, random fp16 weights, open gates, on CUDA.

    ``cfg`` / ``device`` let the same code be smoke-run small on a CPU (in fp32 there)."""
    from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig

    tiny = build_tiny_llm(workdir, dim=64, n_layers=1, n_heads=4)
    cfg = cfg or AdapterLlamaConfig()
    torch.set_default_dtype(torch.float16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = AdapterLlama(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.gate.fill_(0.1)
    return Generator(model, FoldedTokenizer(tiny.tokenizer))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_streams(n: int, one_request, visual: np.ndarray) -> dict:
    """n client threads at once; ``one_request(i, f_m, on_token)`` returns the token count and
    calls ``on_token`` at its first token (or with the time to it)."""
    ttft: list[float] = [0.0] * n
    tokens = [0] * n
    start = threading.Barrier(n + 1)

    def client(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        first = []

        def on_piece(known: float | None = None) -> None:
            if not first:
                first.append(time.perf_counter() - t0 if known is None else known)

        tokens[i] = one_request(i, visual[i % len(visual)], on_piece)
        ttft[i] = first[0] if first else float("nan")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "streams": n,
        "tokens": sum(tokens),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
    }


def serial_request(gen: Generator, pool: ThreadPoolExecutor, tokens: int):
    """The service before in-flight batching: each request's whole ``Generator.stream`` in
    one thread."""

    def one(i: int, f_m: np.ndarray, on_piece) -> int:
        def work() -> int:
            n = 0
            for _ in gen.stream(
                [PROMPTS[i % len(PROMPTS)]], f_m[None], tokens, 0.0, ignore_eos=True
            ):
                n += 1
                on_piece()
            return n

        return pool.submit(work).result()

    return one


def batched_request(sched: Scheduler, tokens: int):
    def one(i: int, f_m: np.ndarray, on_piece) -> int:
        got = threading.Event()

        def sink(kind: str, value) -> None:
            if kind in ("end", "error"):
                got.set()

        handle = sched.submit(
            PROMPTS[i % len(PROMPTS)],
            f_m,
            max_new_tokens=tokens,
            temperature=0.0,
            ignore_eos=True,
            sink=sink,
        )
        got.wait()
        on_piece(handle.first_token_s)
        return len(handle.tokens)

    return one


def decode_ms_by_thread(gen: Generator, sched: Scheduler, f_m: np.ndarray, tokens: int) -> dict:
    """Per-token time of one stream: main thread, a one-thread pool, the scheduler's thread."""

    def stream() -> float:
        t0 = time.perf_counter()
        n = sum(1 for _ in gen.stream([PROMPTS[0]], f_m[None], tokens, 0.0, ignore_eos=True))
        return 1000 * (time.perf_counter() - t0) / n

    def scheduled() -> float:
        t0 = time.perf_counter()
        handle = sched.submit(PROMPTS[0], f_m, max_new_tokens=tokens, temperature=0.0)
        n = sum(1 for _ in handle) and len(handle.tokens)
        return 1000 * (time.perf_counter() - t0) / max(n, 1)

    with ThreadPoolExecutor(1) as pool:
        out = {"main_ms": [], "pool_ms": [], "scheduler_ms": []}
        for _ in range(2):
            out["main_ms"].append(stream())
            out["pool_ms"].append(pool.submit(stream).result())
            out["scheduler_ms"].append(scheduled())
    return {k: round(min(v), 2) for k, v in out.items()}


def bench_serve(args) -> dict:
    torch.set_num_threads(args.threads)
    gpu = args.gpu == "yes"
    with tempfile.TemporaryDirectory() as tmp:
        if gpu:
            gen = gpu_generator(Path(tmp))
        else:
            gen = build_tiny_llm(Path(tmp), dim=args.dim, n_layers=args.layers, n_heads=args.heads)
    visual = np.random.default_rng(0).standard_normal((8, gen.visual_dim)).astype(np.float32)
    streams = [int(s) for s in args.streams.split(",")]
    sched = Scheduler(
        gen, max_batch=max(streams), max_queue=max(streams), prefill_chunk=args.prefill_chunk
    )
    gen.generate(["warm up"], visual[0], 4, 0.0)
    "".join(sched.submit("warm up", visual[0], max_new_tokens=4))
    result = {
        "mode": "serve-gpu" if gpu else "serve-cpu",
        "device": str(gen.device),
        "params_m": round(sum(p.numel() for p in gen.model.parameters()) / 1e6, 1),
        "threads": args.threads,
        "tokens_per_request": args.tokens,
        "prefill_chunk": args.prefill_chunk,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "decode_one_stream": decode_ms_by_thread(gen, sched, visual[0], args.tokens),
        "runs": [],
    }
    with ThreadPoolExecutor(1, thread_name_prefix="serial-llm") as pool:
        for n in streams:
            serial = run_streams(n, serial_request(gen, pool, args.tokens), visual)
            batched = run_streams(n, batched_request(sched, args.tokens), visual)
            ratio = batched["tokens_per_s"] / serial["tokens_per_s"]
            result["runs"].append(
                {"serial": serial, "batched": batched, "speedup": round(ratio, 2)}
            )
            print(f"# {n} streams: x{ratio:.2f}", flush=True)
    sched.close()
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result
