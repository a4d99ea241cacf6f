"""Generation against its ceiling: what the model itself does at batch 1 and N, against what
the scheduler and the HTTP service make of it, in one run on the same model.

    .venv/bin/python benchmarks/bench_generate_ceiling.py [--streams 16] [--tokens 48]
        [--dim 512 --layers 8 --heads 8] [--threads 1] [--profile] [--device cuda]

Parts, each as tokens/s and as a fraction of the hand-stepped ceiling at N:

* ceiling: ``AdapterLlama.forward`` on one token per row with a ``DynamicCache``, greedy, a
  visual query per row (the adapter on), stepped by hand at batch 1 and at batch N;
* prefill: prompt tokens/s of one forward over 1 and N templated visual prompts, and the
  bound it puts on TTFT: the last of N prompts arriving together cannot have its first token
  before N / (the batching gain) times one prompt's prefill;
* scheduler: N concurrent in-process requests on ``inject.scheduler.Scheduler`` (half of
  them text-only, half with a visual query; greedy; EOS ignored), and 1 alone (a visual one,
  the heavier kind: request 0 of every run has the visual query);
* http: N concurrent streaming requests through a real server on 127.0.0.1, native
  ``/v1/generate`` and OpenAI ``/v1/chat/completions`` (half of them with an image), and 1,
  the clients in a process of their own. Tokens are the server's own ``usage`` counts (an
  answer may end at EOS before ``--tokens``).

Every part also gives the CPU seconds each thread spent (``cpu_s``; for HTTP the server
process's threads and the clients'): the work done, which the machine's load moves far less
than the wall time.

TTFT is reported at N and at 1 stream (p50). ``--profile``: cProfile of the scheduler's
decode steps at N streams, top entries by own time and by cumulative time, and the Python and
torch calls per decode step at 1 and N streams (counts, which the machine's load does not move).
``--device cuda``: the same parts on the GPU (``--preset 7b``: LLaMA-7B-shaped random fp16
weights, the tiny tokenizer folded; otherwise the small model moved to the GPU); the lent GPU
machine lacks the server's dependencies, so its runbook passes ``--no-http``.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import functools
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# The demo-cache and media builders are test code, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cachebind.inject import Generator  # noqa: E402
from cachebind.inject.prompts import format_prompt  # noqa: E402
from cachebind.inject.scheduler import Scheduler  # noqa: E402

if TYPE_CHECKING:  # the GPU machine has no HTTP client: the HTTP parts import it when run
    import httpx

VISUAL_DIM = 64  # the tiny encoder's output, which the HTTP service feeds the bind network
PROMPTS = [
    "Describe the image.",
    "What is in this picture?",
    "Two dogs are playing near the river: what else is there?",
    "Describe the sound.",
]


def build(args: argparse.Namespace, workdir: Path) -> Generator:
    from cachebind.inject import build_tiny_llm

    if args.preset == "7b":
        from bench_generate_serve import gpu_generator

        from cachebind.inject.model import AdapterLlamaConfig

        return gpu_generator(workdir, AdapterLlamaConfig(bind_in_dim=VISUAL_DIM), args.device)
    gen = build_tiny_llm(
        workdir, dim=args.dim, n_layers=args.layers, n_heads=args.heads, visual_dim=VISUAL_DIM
    )
    if args.device != "cpu":
        gen.model.to(args.device)
    return gen


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def ceiling(gen: Generator, batch: int, tokens: int, visual: torch.Tensor) -> tuple[float, float]:
    """Tokens/s of the model stepped by hand: one token per row per forward, greedy; per
    wall second and per CPU second of this thread (on a CPU with one intra-op thread, the
    work itself, which the machine's load stretches far less)."""
    from transformers.cache_utils import DynamicCache

    model, device = gen.model, gen.model.device
    # The prompt as the service feeds it (the Alpaca template): the same cache lengths.
    ids = gen.tokenizer.encode(format_prompt(PROMPTS[0]), bos=True)
    prompt = torch.tensor([ids] * batch, device=device)
    t_i = model.visual_query(visual[:batch].to(device))
    best = best_cpu = float("inf")
    for _ in range(2):  # the first run warms the allocator and the kernels
        cache = DynamicCache(config=model.llm.config)
        out = model(prompt, visual=t_i, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        for step in range(tokens):
            pos = torch.full((batch, 1), len(ids) + step, device=device)
            out = model(
                token,
                visual=t_i,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.thread_time() - start_cpu)
    return batch * tokens / best, batch * tokens / best_cpu


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each thread of this process has used, keyed by the Python
    thread's name ("native" for threads Python did not start: torch's pools); read from
    /proc, so it is the work done, whatever the load."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(task.name), "native")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


@torch.inference_mode()
def prefill_rate(gen: Generator, batch: int, visual: torch.Tensor) -> tuple[float, float]:
    """Prompt tokens/s of one forward over ``batch`` templated visual prompts (best of 3),
    per wall second and per CPU second of this thread."""
    model, device = gen.model, gen.model.device
    ids = gen.tokenizer.encode(format_prompt(PROMPTS[0]), bos=True)
    prompt = torch.tensor([ids] * batch, device=device)
    t_i = model.visual_query(visual[:batch].to(device))
    best = best_cpu = float("inf")
    for _ in range(3):
        sync(device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        model(prompt, visual=t_i, logits_to_keep=1)
        sync(device)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.thread_time() - start_cpu)
    return batch * len(ids) / best, batch * len(ids) / best_cpu


def concurrently(n: int, one: Callable[[int], tuple[int, float]]) -> dict[str, Any]:
    """n client threads released at once; ``one(i)`` returns (tokens, seconds to first).
    Also the CPU seconds each kind of thread spent meanwhile (``cpu_s``, see thread_cpu_s)."""
    results: list[tuple[int, float]] = [(0, float("nan"))] * n
    client_cpu = [0.0] * n  # a joined thread leaves /proc: each client counts its own
    gate = threading.Barrier(n + 1)

    def client(i: int) -> None:
        gate.wait()
        start = time.thread_time()
        results[i] = one(i)
        client_cpu[i] = time.thread_time() - start

    threads = [
        threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(n)
    ]
    for t in threads:
        t.start()
    gate.wait()
    cpu_before = thread_cpu_s()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu_after = thread_cpu_s()
    # Four decimals: a small run's threads spend milliseconds, which two would round to 0.
    cpu = {k: round(v - cpu_before.get(k, 0.0), 4) for k, v in cpu_after.items()}
    cpu["client"] = round(sum(client_cpu), 4)
    tokens = sum(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    return {
        "streams": n,
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_mean_s": round(statistics.fmean(ttft), 4),
        "ttft_p90_s": round(ttft[min(n - 1, math.ceil(0.9 * n) - 1)], 4),
        "wall_s": round(wall, 2),
        "cpu_s": {k: v for k, v in sorted(cpu.items()) if v > 0},
    }


def scheduler_request(sched: Scheduler, tokens: int, visual: np.ndarray):
    def one(i: int) -> tuple[int, float]:
        handle = sched.submit(
            PROMPTS[i % len(PROMPTS)],
            visual[i] if i % 2 == 0 else None,
            max_new_tokens=tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        for _ in handle:
            pass
        return len(handle.tokens), float(handle.first_token_s or float("nan"))

    return one


def native_request(client_of: Callable[[], httpx.Client], tokens: int, image: str):
    def one(i: int) -> tuple[int, float]:
        body: dict[str, Any] = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": tokens,
            "temperature": 0.0,
        }
        if i % 2 == 0:
            body["inputs"] = [{"modality": "image", "data": image}]
        start, first, count = time.perf_counter(), float("nan"), 0
        with client_of() as c, c.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200, r.read()
            done = False
            for line in r.iter_lines():
                if line.startswith("event: done"):
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if done:
                        count = event["usage"]["completion_tokens"]
                    elif "text" in event and first != first:
                        first = time.perf_counter() - start
        return count, first

    return one


def chat_request(client_of: Callable[[], httpx.Client], tokens: int, image: str):
    def one(i: int) -> tuple[int, float]:
        content: list[dict[str, Any]] = [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]
        if i % 2 == 0:
            url = f"data:image/png;base64,{image}"
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        body = {
            "model": "imagebind-llm",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start, first, count = time.perf_counter(), float("nan"), 0
        with client_of() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content") and first != first:
                    first = time.perf_counter() - start
        return count, first

    return one


class _TimedModel:
    """The scheduler's model, timing each forward call (synchronised on a GPU)."""

    def __init__(self, model: torch.nn.Module, spent: list[float]) -> None:
        self.inner, self.spent = model, spent
        self.columns = 0  # token columns computed, padding included (decode and prefill)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.inner.device)
        self.spent.append(time.perf_counter() - start)
        self.columns += args[0].numel()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _FirstTokensCpu:
    """The scheduler thread's CPU clock at each first token (called on that thread)."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def first_token(self, seconds: float) -> None:
        self.at.append(time.thread_time())

    def scheduler_state(self, queued: int, running: int) -> None:
        pass

    def tokens(self, n: int) -> None:
        pass

    def finished(self, reason: str) -> None:
        pass


class Timed:
    """Mixed into a scheduler class: records each decode step's wall time and its model
    forward's; the rest is the step's overhead (inputs, sampling, bookkeeping, the hand-over
    to the delivery thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forwards: list[float] = []
        self.steps_s: list[tuple[int, float, float]] = []  # (rows, step, forward)
        self.decode_columns = 0
        self.firsts = _FirstTokensCpu()
        self.observer = self.firsts
        self._cpu_clock = time.pthread_getcpuclockid(self._thread.ident)
        self._cpu_at_reset = 0.0
        self.model = _TimedModel(self.model, self._forwards)  # type: ignore[assignment]

    def _decode(self, rows: list) -> None:
        start = time.perf_counter()
        columns = self.model.columns
        super()._decode(rows)
        self.decode_columns += self.model.columns - columns
        self.steps_s.append((len(rows), time.perf_counter() - start, self._forwards[-1]))

    def reset(self) -> None:
        """Before a burst of requests submitted at once (the scheduler idle)."""
        self.steps_s.clear()
        self.model.columns = self.decode_columns = 0
        self.firsts.at.clear()
        self._cpu_at_reset = time.clock_gettime(self._cpu_clock)

    def overhead(self, rows: int) -> dict[str, float]:
        """Median step and overhead (step minus forward) over the steps that decoded ``rows``,
        TTFT in CPU seconds and the prompt columns prefilled since ``reset`` (padding
        included)."""
        full = [(step, step - fwd) for n, step, fwd in self.steps_s if n == rows]
        if not full:
            return {}
        # TTFT in the scheduler thread's CPU seconds: the work done before each first token,
        # which the other processes on the machine do not stretch as they stretch wall time.
        ttft = sorted(t - self._cpu_at_reset for t in self.firsts.at)
        return {
            "ttft_cpu_mean_s": round(statistics.fmean(ttft), 4),
            "ttft_cpu_p90_s": round(ttft[min(len(ttft), math.ceil(0.9 * len(ttft))) - 1], 4),
            "prefill_columns": self.model.columns - self.decode_columns,
            "decode_steps": len(full),
            "step_ms_p50": round(1000 * statistics.median(s for s, _ in full), 2),
            "overhead_ms_p50": round(1000 * statistics.median(o for _, o in full), 3),
        }


class TimedScheduler(Timed, Scheduler):
    """The scheduler of this tree, timed."""


class ProfiledScheduler(Scheduler):
    """A scheduler whose decode steps (the batched forward, sampling, bookkeeping and the
    hand-over to the delivery thread) run under cProfile; prefill chunks do not."""

    profile: cProfile.Profile

    def _run(self) -> None:
        self.profile = cProfile.Profile()
        super()._run()

    def _decode(self, rows: list) -> None:
        self.profile.enable()
        try:
            super()._decode(rows)
        finally:
            self.profile.disable()


def profiled(gen: Generator, streams: int, tokens: int, visual: np.ndarray) -> pstats.Stats:
    sched = ProfiledScheduler(gen, max_batch=streams, max_queue=streams)
    concurrently(streams, scheduler_request(sched, tokens, visual))
    sched.close()
    return pstats.Stats(sched.profile, stream=io.StringIO())


def decode_calls(stats: pstats.Stats) -> dict[str, float]:
    """Python function calls and torch calls per decode step (their count, unlike their time,
    does not depend on the machine's load): what a step costs besides the matmuls."""
    per_function = stats.stats  # type: ignore[attr-defined]
    steps = next(v[1] for k, v in per_function.items() if k[2] == "_decode")
    calls = sum(v[1] for v in per_function.values())
    torch_ops = sum(v[1] for k, v in per_function.items() if k[0] == "~" and "torch" in k[2])
    return {"decode_steps": steps, "calls_per_step": round(calls / steps, 1),
            "torch_builtin_calls_per_step": round(torch_ops / steps, 1)}  # fmt: skip


def profile_decode(gen: Generator, args: argparse.Namespace, visual: np.ndarray) -> str:
    """Where a step's time goes at N streams, and how its call count grows from 1 to N."""
    one = decode_calls(profiled(gen, 1, args.tokens, visual))
    stats = profiled(gen, args.streams, args.tokens, visual)
    many = decode_calls(stats)
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    counts = {"1": one, str(args.streams): many}
    return out.getvalue() + "calls per decode step: " + json.dumps(counts)


def http_clients(url: str, key: str, route: str, tokens: int, image: str, n: int) -> dict:
    """In the client process: n concurrent requests to ``route`` (n = 0: one, to warm)."""
    import httpx

    def client_of() -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=url, headers=headers, timeout=600)

    kind = {"native": native_request, "openai_chat": chat_request}[route]
    request = kind(client_of, tokens, image)
    if n == 0:
        request(0)
        return {}
    return concurrently(n, request)


def served(clients: Executor, call: Callable[[int], dict], n: int) -> dict[str, Any]:
    """``call(n)`` in the client process, with the CPU seconds each thread of this (the
    server's) process spent meanwhile."""
    before = thread_cpu_s()
    part = clients.submit(call, n).result()
    after = thread_cpu_s()
    part["client_cpu_s"] = part.pop("cpu_s")
    server = {k: round(v - before.get(k, 0.0), 4) for k, v in after.items()}
    part["server_cpu_s"] = {k: v for k, v in sorted(server.items()) if v > 0}
    return part


def http_parts(gen: Generator, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """The service on 127.0.0.1, its clients in a process of their own: 16 Python clients
    parsing SSE beside the server would take the GIL and a core from the service measured."""
    from builders import TableFlatLoader, build_demo_cache, service_settings
    from fixtures_media import image_bytes

    from cachebind.config import LLMConfig
    from cachebind.encode import Encoder
    from cachebind.serve import start_server
    from cachebind.serve.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = build_demo_cache(root, rows=200, dim=VISUAL_DIM)
        svc = service_settings(root, cache, index_poll_s=0)
        loader = TableFlatLoader(cache.store)
        runtime = Runtime(
            Encoder.from_config(svc.settings.encoder, svc.settings.weights),
            snapshot=loader.load(),
            loader=loader,
            generator=gen,
            cache_config=svc.settings.cache,
            llm_config=LLMConfig(max_batch=n, max_queue=n),
        )
        server = start_server(svc.settings, runtime, port=0)
        image = base64.b64encode(image_bytes(seed=3)).decode()
        out: dict[str, Any] = {}
        spawn = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(1, mp_context=spawn) as clients:
                for name in ("native", "openai_chat"):
                    call = functools.partial(
                        http_clients, server.url, svc.user_key, name, args.tokens, image
                    )
                    clients.submit(call, 0).result()  # warm: the image path, the route
                    out[name] = {str(k): served(clients, call, k) for k in (1, n)}
        finally:
            server.stop()
            if runtime.scheduler is not None:
                runtime.scheduler.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    n = args.streams
    with tempfile.TemporaryDirectory() as tmp:
        gen = build(args, Path(tmp))
    visual_np = np.random.default_rng(0).standard_normal((n, VISUAL_DIM)).astype(np.float32)
    visual = torch.from_numpy(visual_np)
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": str(gen.device),
        "model": {
            "preset": args.preset,
            "dim": gen.model.cfg.dim,
            "layers": gen.model.cfg.n_layers,
            "heads": gen.model.cfg.n_heads,
            "dtype": str(gen.model.dtype),
            "params_m": round(sum(p.numel() for p in gen.model.parameters()) / 1e6, 1),
        },
        "threads": args.threads,
        "streams": n,
        "tokens_per_request": args.tokens,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    if args.profile:
        print(profile_decode(gen, args, visual_np))
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        return result
    ceiling_1, cpu_1 = ceiling(gen, 1, args.tokens, visual)
    ceiling_n, cpu_n = ceiling(gen, n, args.tokens, visual)
    result["ceiling"] = {
        "1": round(ceiling_1, 1),
        str(n): round(ceiling_n, 1),
        "batching_x": round(ceiling_n / ceiling_1, 2),
        "per_cpu_s": {"1": round(cpu_1, 1), str(n): round(cpu_n, 1)},
    }
    # What physics allows TTFT: N prompts' prefill cannot cost less than N / (its batching
    # gain) times one prompt's, and the last of N arrivals waits for all of it.
    (prefill_1, prefill_cpu_1), (prefill_n, prefill_cpu_n) = (
        prefill_rate(gen, 1, visual),
        prefill_rate(gen, n, visual),
    )
    result["prefill_tokens_per_s"] = {
        "1": round(prefill_1, 1),
        str(n): round(prefill_n, 1),
        "per_cpu_s": {"1": round(prefill_cpu_1, 1), str(n): round(prefill_cpu_n, 1)},
        "last_ttft_bound_n_over_1": round(n * prefill_1 / prefill_n, 2),
    }
    sched = TimedScheduler(gen, max_batch=n, max_queue=n)
    request = scheduler_request(sched, args.tokens, visual_np)
    request(0)  # warm
    result["scheduler"] = {}
    for streams in (1, n):
        sched.reset()
        result["scheduler"][str(streams)] = concurrently(streams, request)
        result["scheduler"][str(streams)] |= sched.overhead(streams)
    sched.close()
    if not args.no_http:
        result["http"] = http_parts(gen, args, n)
    parts = {"scheduler": result["scheduler"], **result.get("http", {})}
    result["summary"] = {
        name: {
            "tokens_per_s": part[str(n)]["tokens_per_s"],
            "of_ceiling": round(part[str(n)]["tokens_per_s"] / ceiling_n, 3),
            "x_one_stream": round(part[str(n)]["tokens_per_s"] / part["1"]["tokens_per_s"], 2),
            "ttft_n_over_1": round(part[str(n)]["ttft_p50_s"] / part["1"]["ttft_p50_s"], 2),
        }
        for name, part in parts.items()
    }
    for name, part in parts.items():  # the engine's work per token against the ceiling's
        many = part[str(n)]
        cpu = many["server_cpu_s"] if "server_cpu_s" in many else many["cpu_s"]
        if args.device == "cpu" and args.threads == 1:
            work = sum(v for k, v in cpu.items() if k != "client")
            # None: too little work for the thread clocks to tell (a smoke-sized run).
            of_cpu = round(many["tokens"] / work / cpu_n, 3) if work > 0 else None
            result["summary"][name]["of_ceiling_cpu"] = of_cpu
    one, many = result["scheduler"]["1"], result["scheduler"][str(n)]
    if one.get("ttft_cpu_mean_s"):  # in CPU seconds: what the load moves least
        result["summary"]["scheduler"] |= {
            "ttft_cpu_mean_n_over_1": round(many["ttft_cpu_mean_s"] / one["ttft_cpu_mean_s"], 2),
            "ttft_cpu_p90_n_over_1": round(many["ttft_cpu_p90_s"] / one["ttft_cpu_mean_s"], 2),
        }
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", choices=["small", "7b"], default="small")
    parser.add_argument("--profile", action="store_true", help="cProfile the decode steps")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP parts")
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
