"""Vision-encoder throughput (images/s) and model FLOP utilisation, ours beside the reference.

The reference is the official ImageBind model code (imagebind-unofficial 0.1.1, loaded through
tests/oracle.py) with the same weights, timed in the same run on the same inputs.

CPU (default, a small configuration that runs on 2 cores)::

    .venv/bin/python benchmarks/bench_encoder.py

GPU, the real model::

    python benchmarks/bench_encoder.py --device cuda --preset huge --dtype bf16 --batch-size 256

FLOPs per image are computed analytically (2 per multiply-add; ~334 GFLOP for huge). MFU is
achieved FLOP/s over a peak: the bf16 dense spec of an H100/H200 on those GPUs, else (CPU) the
FLOP/s of a large matrix product measured here, in the same dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cachebind.encode.imagebind import PRESETS, ImageBindModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16/fp16 tensor-core peaks (SXM parts).
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# A ViT-S/14-like vision trunk (6 blocks): enough work per image to measure on 2 CPU cores.
SMALL = {
    **PRESETS["tiny"],
    "vision_embed_dim": 384,
    "vision_num_blocks": 6,
    "vision_num_heads": 6,
    "out_embed_dim": 384,
}


def model_kwargs(preset: str) -> dict:
    return dict(SMALL) if preset == "small" else dict(PRESETS[preset])


def build_pair(
    kwargs: dict, device: torch.device, reference: bool
) -> tuple[ImageBindModel, object]:
    """Ours and (optionally) the reference, with identical random weights, on ``device``."""
    with torch.device("meta"):
        ours = ImageBindModel(**kwargs)
    ours = ours.to_empty(device=device)
    # Throughput does not depend on the values; fill fast and keep activations well scaled.
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in ours.state_dict().items():
            if name.endswith("text.mask"):
                t.copy_(torch.full_like(t, float("-inf")).triu_(1))
            elif "norm" in name or "pre_transformer_layer" in name or ".0.weight" in name:
                t.fill_(1.0 if name.endswith("weight") else 0.0)
            elif t.ndim == 0:
                t.fill_(2.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
    ours.eval().requires_grad_(False)
    ref = None
    if reference:
        import oracle

        with oracle._MetaExceptLinspace():
            ref = oracle.reference().ImageBindModel(**kwargs)
        ref = ref.to_empty(device=device)
        ref.load_state_dict(ours.state_dict(), strict=True)
        ref.eval().requires_grad_(False)
    return ours, ref


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_fns(
    fns: list[Callable[[], object]], device: torch.device, iters: int, warmup: int
) -> list[list[float]]:
    """Per-call seconds of each function, calls interleaved (a, b, a, b, …) so that load from
    other processes on a shared machine hits every function alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            times[i].append(_timed(fn, device))
    return times


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                scale = 0.5 if dtype == torch.float32 else 1.0  # tf32 is half of bf16
                return tflops * 1e12 * scale, f"{name} spec"
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(time_fns([lambda: a @ b], device, iters=10, warmup=2)[0])
    return 2 * n**3 / seconds, f"measured {n}^3 matmul"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", choices=["small", *PRESETS])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-reference", action="store_true", help="time only our implementation")
    p.add_argument("--compile", action="store_true", help="torch.compile our vision encoder")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: spec or measured)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch default if unset)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    kwargs = model_kwargs(args.preset)
    ours, ref = build_pair(kwargs, device, reference=not args.no_reference)
    flops = ours.vision_flops()
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    encode = ours.encode
    if args.compile:
        encode = torch.compile(ours.encode)

    def run_ours() -> torch.Tensor:
        with torch.inference_mode(), autocast():
            return encode("vision", x)

    def run_ref() -> torch.Tensor:
        with torch.inference_mode(), autocast():
            return ref({"vision": x})["vision"]

    fns = [run_ours] if ref is None else [run_ours, run_ref]
    times = time_fns(fns, device, args.iters, args.warmup)
    # Medians: robust to bursts of load from other processes.
    ours_ips = args.batch_size / statistics.median(times[0])
    ref_ips = None
    if ref is not None:
        ref_ips = args.batch_size / statistics.median(times[1])
        ratios = [r / o for o, r in zip(times[0], times[1], strict=True)]
        diff = (run_ours().float() - run_ref().float()).abs().max().item()
    if args.peak_tflops:
        peak, peak_how = args.peak_tflops * 1e12, "given"
    else:
        peak, peak_how = peak_flops(device, dtype)
    achieved = ours_ips * flops

    print(
        f"# vision encoder, preset={args.preset} ({kwargs['vision_embed_dim']}d x "
        f"{kwargs['vision_num_blocks']} blocks), {flops / 1e9:.1f} GFLOP/image, "
        f"threads={torch.get_num_threads()}, peak {peak / 1e12:.2f} TFLOP/s ({peak_how})"
    )
    if ref is not None:
        print(f"# max |ours - reference| on this batch: {diff:.2e}")
        print(
            "# per-pair speed-up (reference time / ours, interleaved calls): "
            + ", ".join(f"{r:.2f}" for r in ratios)
        )
    print(
        "| device | preset | dtype | batch | GFLOP/img | ours img/s | reference img/s | ratio "
        "| ours TFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref_col = f"{ref_ips:.2f}" if ref_ips else "-"
    ratio = f"{ours_ips / ref_ips:.2f}x" if ref_ips else "-"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"| {dev} | {args.preset} | {args.dtype} | {args.batch_size} | {flops / 1e9:.1f} "
        f"| {ours_ips:.2f} | {ref_col} | {ratio} | {achieved / 1e12:.3g} "
        f"| {100 * achieved / peak:.3g}% |"
    )


if __name__ == "__main__":
    main()
