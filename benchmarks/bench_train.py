"""Stage-1 training throughput (samples/s): from the cache (F_M read, as ``cachebind train``)
against the released way (every image through the frozen ImageBind encoder on every step), the
same model, batch and step, timed alternately in one run.

CPU (default, a small configuration that runs on 2 cores)::

    .venv/bin/python benchmarks/bench_train.py

GPU, the paper's shapes (huge encoder, 7B-shaped LLaMA, bf16 autocast)::

    python benchmarks/bench_train.py --device cuda --preset huge --llm 7b --batch-size 8

Both sides run the identical optimiser step (``cachebind.train.step.optimizer_step``); the
released side first encodes the batch's preprocessed images under ``no_grad`` (ImageBind is
frozen). Image decoding and augmentation are *not* counted for the released side, which
flatters it: the ratio is a lower bound on what the cache saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cachebind.encode.imagebind import PRESETS, ImageBindModel  # noqa: E402
from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig  # noqa: E402
from cachebind.train.data import Batch  # noqa: E402
from cachebind.train.params import set_trainability  # noqa: E402
from cachebind.train.step import LossModule, make_optimizer, optimizer_step  # noqa: E402

LLMS = {
    # dim 256, 4 layers: enough work per step to measure on 2 CPU cores.
    "small": dict(dim=256, n_layers=4, n_heads=4, vocab_size=1024, ffn_hidden=688),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_hidden=11008),
}


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    shape = LLMS[args.llm]
    cfg = AdapterLlamaConfig(
        **shape,
        w_bias=False,
        lora_rank=0,
        query_layer=shape["n_layers"],
        bind_in_dim=1024,
        bind_hidden=4 * shape["dim"],
        max_seq_len=512,
    )
    with torch.device(device):
        model = AdapterLlama(cfg).to(dtype)
    trainable = set_trainability(model.train(), "pretrain")
    encoder = ImageBindModel(**PRESETS[args.preset]).to(device=device, dtype=dtype).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return model, trainable, encoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", help="ImageBind preset (small, huge)")
    p.add_argument("--llm", default="small", choices=sorted(LLMS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-words", type=int, default=96, help="tokens per example (release: 96)")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, trainable, encoder = build(args, device, dtype)
    optimizer = make_optimizer(trainable, lr=1e-4, weight_decay=0.05)
    module = LossModule(model)
    b, s = args.batch_size, args.max_words
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.vocab_size, (b, s), generator=g).to(device)
    labels = tokens.clone()
    labels[:, : s // 2] = 0  # the prompt half carries no label
    images = torch.randn(b, 3, 224, 224, generator=g).to(device=device, dtype=dtype)
    cached = F.normalize(torch.randn(b, 1024, generator=g), dim=-1).to(device)
    autocast = torch.bfloat16 if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def from_cache() -> None:
        optimizer_step(module, optimizer, [Batch(cached, tokens, labels)], autocast)

    def released() -> None:
        with torch.no_grad():
            f_m = F.normalize(encoder.encode("vision", images).float(), dim=-1)
        optimizer_step(module, optimizer, [Batch(f_m, tokens, labels)], autocast)

    times: dict[str, list[float]] = {"cache": [], "released": []}
    for fn in (from_cache, released):  # warm-up
        fn()
    sync()
    for _ in range(args.iters):
        for name, fn in (("cache", from_cache), ("released", released)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    rate = {k: b / statistics.median(v) for k, v in times.items()}
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "preset": args.preset,
        "llm": args.llm,
        "batch": b,
        "max_words": s,
        "samples_per_s_cache": round(rate["cache"], 2),
        "samples_per_s_released": round(rate["released"], 2),
        "ratio": round(rate["cache"] / rate["released"], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
