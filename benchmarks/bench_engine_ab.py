"""The scheduler of an earlier commit against this tree's, alternating in one process on one
model: on a shared machine the load moves between two runs, not between two rounds a second
apart, so only an alternating comparison says which engine is faster.

    .venv/bin/python benchmarks/bench_engine_ab.py --old <commit> [--rounds 3] [--streams 16]
        [--tokens 32] [--dim 512 --layers 8 --heads 8] [--threads 1] [--chunks 64,256,2048]

The old engine is the old commit's ``inject/{scheduler,slots,delivery,prefix,sampling,handles}.py``
loaded as a package of its own beside ``cachebind``; the model, tokenizer and generator are this
tree's, shared by both. Each round runs N concurrent in-process requests on each engine (half
text-only, greedy, EOS ignored) and prints tokens/s, TTFT (mean, p90) and the median decode
step and its overhead at N rows, with the load average. ``--chunks``: this tree's engine at
each ``prefill_chunk`` instead (2048: every arrival's prompt in the first step; 64: short
chunks between decode steps), no old commit needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate_ceiling import (  # noqa: E402
    VISUAL_DIM,
    Timed,
    TimedScheduler,
    build,
    concurrently,
    scheduler_request,
)

ENGINE = ("scheduler", "slots", "delivery", "prefix", "sampling", "handles")
ROOT = Path(__file__).resolve().parents[1]


def old_scheduler(commit: str, into: Path) -> type:
    """The ``Scheduler`` class of ``commit``, its engine modules importing one another."""
    package = into / "old_engine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ENGINE:
        source = subprocess.run(
            ["git", "show", f"{commit}:cachebind/inject/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for other in ENGINE:
            source = source.replace(f"cachebind.inject.{other} ", f"old_engine.{other} ")
        (package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(into))
    return importlib.import_module("old_engine.scheduler").Scheduler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="the commit whose scheduler to compare")
    parser.add_argument("--chunks", help="prefill_chunk values to compare (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.streams
    with tempfile.TemporaryDirectory() as tmp:
        gen = build(args, Path(tmp))
        visual = np.random.default_rng(0).standard_normal((n, VISUAL_DIM)).astype(np.float32)
        engines: dict[str, tuple[type, dict[str, int]]] = {}
        if args.old:
            old = type("TimedOld", (Timed, old_scheduler(args.old, Path(tmp))), {})
            engines = {"old": (old, {}), "new": (TimedScheduler, {})}
        for chunk in args.chunks.split(",") if args.chunks else ():
            engines[f"chunk {chunk}"] = (TimedScheduler, {"prefill_chunk": int(chunk)})
        if not engines:
            parser.error("say --old, --chunks or both")
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for name, (cls, options) in engines.items():
                sched = cls(gen, max_batch=n, max_queue=n, **options)
                request = scheduler_request(sched, args.tokens, visual)
                request(0)  # warm
                sched.reset()
                part = concurrently(n, request) | sched.overhead(n)
                sched.close()
                part |= {"round": r, "engine": name, "load": round(os.getloadavg()[0], 2)}
                rounds.append(part)
                print(json.dumps(part), flush=True)


if __name__ == "__main__":
    main()
