"""Generation benchmark: decode speed and the cost of the cache (retrieval + blend).

CPU mode (always): a small LLaMA + ImageBind-LLM adapter written in the released layouts and
loaded through the real conversion path (``build_tiny_llm``), a real FAISS exact index over
N x 1024 random unit vectors, and one request = ``CacheModel.enhance`` (eq. 3-4) + bind network
+ a 64-token generation. Reports prefill time, decode tokens/s and the share of the request
spent in retrieval + blending.

GPU mode (when CUDA is present): LLaMA-7B-shaped random weights (fp16) with the adapter, decode
tokens/s at batch 1 against the memory-bandwidth bound (~13.5 GB read per token, ~4 ms/token on
an H100).

    .venv/bin/python benchmarks/bench_generate.py [--rows 100000] [--dim 512 --layers 8 --heads 8]

Serving mode (``--serve``, see ``bench_generate_serve.py``): in-flight batching against the
serial executor at 1, 4, 16 and 32 concurrent streams (``--gpu yes``: 7B-shaped fp16 on CUDA).

    .venv/bin/python benchmarks/bench_generate.py --serve [--streams 1,4,16,32] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from cachebind.cache import CacheModel, FaissNeighbours
from cachebind.inject import build_tiny_llm


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(1024)
    for lo in range(0, args.rows, 20_000):  # chunks keep peak memory at the index size
        index.add(unit_rows(min(20_000, args.rows - lo), 1024, seed=lo))
    cache = CacheModel(FaissNeighbours(index))
    build_index_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        gen = build_tiny_llm(Path(tmp), dim=args.dim, n_layers=args.layers, n_heads=args.heads)
        build_llm_s = time.perf_counter() - start

    query = unit_rows(1, 1024, seed=-1 % 2**31)
    cache.enhance(query, k=10)  # warm-up
    gen.generate(["warm up"], query, max_new_tokens=4, temperature=0.0)

    requests = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        enhanced = cache.enhance(query, k=10, t=20.0, alpha=0.5)[0].embedding
        t1 = time.perf_counter()
        step_times = []
        last = time.perf_counter()
        for _ in gen.stream(
            ["Describe the image."],
            enhanced[None],
            max_new_tokens=args.tokens,
            temperature=0.1,
            top_p=0.75,
            seed=r,
            ignore_eos=True,
        ):
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
        t2 = time.perf_counter()
        requests.append(
            {
                "retrieval_blend_s": t1 - t0,
                "prefill_s": step_times[0],  # includes bind network, prompt pass, first sample
                "decode_s": sum(step_times[1:]),
                "tokens": len(step_times),
                "total_s": t2 - t0,
            }
        )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in requests)

    decode_tokens = requests[0]["tokens"] - 1
    return {
        "mode": "cpu",
        "threads": args.threads,
        "index_rows": args.rows,
        "index_build_s": round(build_index_s, 2),
        "llm": {
            "dim": args.dim,
            "layers": args.layers,
            "heads": args.heads,
            "params_m": round(sum(p.numel() for p in gen.model.parameters()) / 1e6, 2),
            "build_and_load_s": round(build_llm_s, 2),
        },
        "tokens_per_request": requests[0]["tokens"],
        "retrieval_blend_ms": round(1000 * med("retrieval_blend_s"), 2),
        "prefill_ms": round(1000 * med("prefill_s"), 2),
        "decode_tokens_per_s": round(decode_tokens / med("decode_s"), 1),
        "request_ms": round(1000 * med("total_s"), 1),
        "retrieval_blend_share": round(med("retrieval_blend_s") / med("total_s"), 4),
    }


def bench_gpu(args: argparse.Namespace, cfg=None, device: str = "cuda") -> dict:
    """7B-shaped decode at batch 1 on random fp16 weights (no files: the cost is the reads).

    ``cfg`` / ``device`` exist so the same code can be smoke-run small on a CPU."""
    from transformers.cache_utils import DynamicCache

    from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig

    cfg = cfg or AdapterLlamaConfig()  # LLaMA-7B + released 7B adapter shapes
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AdapterLlama(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.gate.fill_(0.1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    t_i = model.visual_query(torch.randn(1, cfg.bind_in_dim, device=device))
    ids = torch.randint(3, cfg.vocab_size, (1, 64), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    with torch.inference_mode():
        for _ in range(2):
            kv = DynamicCache(config=model.llm.config)
            model(ids, visual=t_i, past_key_values=kv, use_cache=True, logits_to_keep=1)
            token = ids[:, -1:]
            sync()
            start = time.perf_counter()
            for step in range(args.tokens):
                pos = torch.tensor([[64 + step]], device=device)
                out = model(
                    token,
                    visual=t_i,
                    position_ids=pos,
                    past_key_values=kv,
                    use_cache=True,
                    logits_to_keep=1,
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            elapsed = time.perf_counter() - start
        results = {
            "mode": "gpu",
            "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
            "weights_gb": round(weight_bytes / 1e9, 2),
            "ms_per_token": round(1000 * elapsed / args.tokens, 2),
            "decode_tokens_per_s": round(args.tokens / elapsed, 1),
            "bandwidth_bound_ms_per_token_h100": round(weight_bytes / 3.35e12 * 1000, 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--serve", action="store_true", help="concurrent streams: batched/serial")
    parser.add_argument("--streams", default="1,4,16,32")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="llm.prefill_chunk")
    args = parser.parse_args()
    if args.serve:
        from bench_generate_serve import bench_serve

        if args.gpu == "auto":
            args.gpu = "yes" if torch.cuda.is_available() else "no"
        print(json.dumps(bench_serve(args), indent=2))
        return
    print(json.dumps(bench_cpu(args), indent=2))
    if args.gpu == "yes" or (args.gpu == "auto" and torch.cuda.is_available()):
        print(json.dumps(bench_gpu(args), indent=2))
    else:
        print(json.dumps({"mode": "gpu", "skipped": "no CUDA device"}))


if __name__ == "__main__":
    main()
