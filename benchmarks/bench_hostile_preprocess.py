"""Time and peak memory of the preprocessing entry points on the issue's hostile inputs.

    PYTHONPATH=. python benchmarks/bench_hostile_preprocess.py [--tree DIR]

Each case runs in a fresh process (``--tree`` puts another checkout's ``cachebind`` first, to
compare with an older version): seconds and peak RSS added (``VmHWM`` reset just before the
call). Inputs come from ``tests/hostile_media.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # name: (modality, builder expression, InputLimits overrides for trees that have them)
    "wav_1ch_500_samples_8001Hz": ("audio", "hm.wav(1, 500, 8001)", {}),
    "wav_8ch_500_samples": ("audio", "hm.wav(8, 500)", {}),
    "wav_8ch_10s_44101Hz": ("audio", "hm.wav(8, 441010, 44101)", {}),
    "flac_declaring_240s_6ch_192k": ("audio", "hm.flac_declaring(240, 6, 192000)", {}),
    "png_9000sq_rgba": ("image", "hm.png(9000, 9000)", {}),
    "png_7000sq_rgba": ("image", "hm.png(7000, 7000)", {}),
    "png_30000x2_ratio_allowed": ("image", "hm.png(30000, 2, 2)", {"max_image_aspect_ratio": 1e5}),
    "h264_4096sq_2_frames": ("video", "hm.h264(4096, 4096)", {}),
    "pt_40M_points_deflated": ("point", "hm.torch_points_bomb(40_000_000)", {}),
    "npy_header_1TiB": ("point", "hm.npy_header((2**38, 1024))", {}),
}

CHILD = """
import json, sys, time
sys.path.insert(0, {tests!r})
import hostile_media as hm
from cachebind.errors import InputError
from cachebind.preprocess import preprocess
try:
    from cachebind.config import InputLimits
    kwargs = {{"limits": InputLimits(**{overrides!r})}}
except ImportError:  # an older tree: no limits to pass
    kwargs = {{}}

def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

raw = {builder}
preprocess("image", hm.png(8, 8, 2))  # imports and first-call set-up not measured
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, start = mb("VmRSS"), time.perf_counter()
try:
    preprocess({modality!r}, raw, source="bench", **kwargs)
    outcome = "tensor"
except InputError as e:
    outcome = e.reason
print(json.dumps([len(raw), outcome, time.perf_counter() - start, mb("VmHWM") - before]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose cachebind runs")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.tree)}
    print(f"tree: {args.tree}\n")
    print("| case | bytes | outcome | s | peak RSS added (MB) |")
    print("|---|---:|---|---:|---:|")
    for name, (modality, builder, overrides) in CASES.items():
        code = CHILD.format(
            tests=str(ROOT / "tests"), overrides=overrides, builder=builder, modality=modality
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=env,
                cwd=args.tree,  # python -c puts the working directory first on the path
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"| {name} | | timeout > {args.timeout:.0f} s | | |")
            continue
        if done.returncode != 0:
            why = f"signal {-done.returncode}" if done.returncode < 0 else done.stderr[-120:]
            print(f"| {name} | | died: {why.strip()} | | |")
            continue
        size, outcome, seconds, added = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {size:,} | {outcome} | {seconds:.2f} | {added:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
