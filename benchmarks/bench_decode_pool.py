"""What decoding in the sandbox pool costs per input, against decoding in-process (one torch
thread in both, as a pool worker runs): the price of the isolation the service pays on every
media input.

    .venv/bin/python benchmarks/bench_decode_pool.py --repeats 30

Prints one JSON object: median and p90 milliseconds per input and modality, both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timings(fn, repeats: int) -> dict[str, float]:
    fn()  # warm: first calls load codecs and the tokenizer
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    ms = np.asarray(seconds) * 1000
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import fixtures_media as media
    import torch

    from cachebind.config import InputLimits, SandboxConfig
    from cachebind.preprocess import preprocess
    from cachebind.sandbox import Sandbox

    torch.set_num_threads(1)
    limits = InputLimits()
    inputs = {
        "image (640x480 JPEG)": ("image", media.image_bytes(size=(640, 480), fmt="JPEG")),
        "audio (3 s WAV)": ("audio", media.audio_bytes(duration_s=3.0)),
        "video (1 s 64x48 MP4)": ("video", media.video_bytes(duration_s=1.0)),
    }
    report: dict[str, object] = {"repeats": args.repeats}
    with Sandbox(SandboxConfig(workers=1), preload=("cachebind.preprocess",)) as pool:
        for name, (modality, data) in inputs.items():
            report[name] = {
                "in_process": timings(
                    lambda m=modality, d=data: preprocess(m, d, limits=limits), args.repeats
                ),
                "sandbox": timings(
                    lambda m=modality, d=data: pool.run(
                        preprocess, m, d, source="x", limits=limits
                    ),
                    args.repeats,
                ),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
