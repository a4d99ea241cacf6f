"""LLaVA-1.5 stage-1 throughput (samples/s) from cached patch tokens against through the frozen
encoder, the same projector, LLM, batch and step, timed alternately in one run; and the bytes a
cached row of tokens takes.

CPU (default, small shapes that run on 2 cores)::

    .venv/bin/python benchmarks/bench_tokens.py

GPU (ImageBind-huge's trunk, a 7B-shaped LLaMA, bf16; random weights)::

    python benchmarks/bench_tokens.py --device cuda --preset huge --llm 7b --batch-size 8

The cached side reads the batch's tokens from a Lance table written beforehand in a temporary
directory (``CacheTable.patch_tokens``: the read is timed); the other side runs the encoder's
vision pass under ``no_grad`` on preprocessed pixels (decoding is not counted, which flatters
it). Both then run ``cachebind.train.tokens_step.stage1_step``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cachebind.bind.projector import LlavaProjector  # noqa: E402
from cachebind.config import StoreConfig  # noqa: E402
from cachebind.encode.imagebind import PRESETS, ImageBindModel  # noqa: E402
from cachebind.inject.placement import expand_image_placeholders  # noqa: E402
from cachebind.store import CacheTable, images_schema  # noqa: E402
from cachebind.train.tokens_step import LLAVA_IGNORE, stage1_step  # noqa: E402

LLMS = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, vocab_size=1024),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, vocab_size=32000),
}  # fmt: skip
CAPTION = 24  # caption tokens an example (LLaVA's BLIP captions are short)


def write_tokens_table(root: Path, tokens: np.ndarray, dim: int) -> CacheTable:
    """A Lance images table whose rows hold ``tokens`` [n, patches, width] as patch_tokens."""
    import lance

    n, patches, width = tokens.shape
    schema = images_schema(
        dtype="float16", dim=dim, thumbnail=False, tokens=patches * width,
        metadata={"tokens": {"layer": -2, "patches": patches, "width": width,
                             "dtype": "float16", "cls": False}},
    )  # fmt: skip
    flat = tokens.reshape(-1).astype(np.float16)
    rows = pa.table(
        {
            "id": pa.array(np.arange(n)),
            "key": pa.array([str(i) for i in range(n)]),
            "caption": pa.nulls(n, pa.string()),
            "url": pa.nulls(n, pa.string()),
            "width": pa.nulls(n, pa.int32()),
            "height": pa.nulls(n, pa.int32()),
            "shard": pa.nulls(n, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(n * dim, np.float16)), dim
            ),
            "patch_tokens": pa.FixedSizeListArray.from_arrays(pa.array(flat), patches * width),
        }
    ).cast(schema)
    lance.write_dataset(rows, str(root / "images.lance"))
    return CacheTable.open(StoreConfig(uri=str(root), table="images"))


def run(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", help="ImageBind preset (tiny, small, huge)")
    p.add_argument("--llm", default="small", choices=sorted(LLMS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    b = args.batch_size

    encoder = ImageBindModel(**PRESETS[args.preset]).to(device=device, dtype=dtype).eval()
    encoder.requires_grad_(False)
    patches, width = encoder.vision_token_shape()
    llm_config = LlamaConfig(**LLMS[args.llm], max_position_embeddings=patches + CAPTION + 8)
    with torch.device(device):
        llm = LlamaForCausalLM(llm_config).to(dtype)
        projector = LlavaProjector(width, llm_config.hidden_size).to(dtype)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, 224, 224, generator=g).to(device=device, dtype=dtype)
    image_token = llm_config.vocab_size - 1
    captions = torch.randint(3, image_token, (b, CAPTION), generator=g).tolist()
    ids = [
        expand_image_placeholders([1, image_token, *c, 2], image_token, patches) for c in captions
    ]
    labels = [[LLAVA_IGNORE] * (1 + patches) + c + [2] for c in captions]
    input_ids, label_ids = torch.tensor(ids).to(device), torch.tensor(labels).to(device)

    with torch.no_grad():
        _, fresh = encoder.vision_features_and_tokens(images, -2)
    tmp = tempfile.TemporaryDirectory()
    table = write_tokens_table(Path(tmp.name), fresh.float().cpu().numpy(), dim=16)
    row_ids = list(range(b))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def from_cache() -> None:
        tokens = torch.from_numpy(table.patch_tokens(row_ids)).to(device)
        stage1_step(projector, llm, optimizer, tokens, input_ids, label_ids, image_token)

    def through_encoder() -> None:
        with torch.no_grad():
            _, tokens = encoder.vision_features_and_tokens(images, -2)
        stage1_step(projector, llm, optimizer, tokens, input_ids, label_ids, image_token)

    times: dict[str, list[float]] = {"cache": [], "encoder": []}
    for fn in (from_cache, through_encoder):  # warm-up
        fn()
    sync()
    for _ in range(args.iters):
        for name, fn in (("cache", from_cache), ("encoder", through_encoder)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    tmp.cleanup()
    rate = {k: b / statistics.median(v) for k, v in times.items()}
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "preset": args.preset,
        "llm": args.llm,
        "batch": b,
        "tokens_per_image": patches,
        "token_bytes_per_row": patches * width * 2,
        "samples_per_s_cache": round(rate["cache"], 2),
        "samples_per_s_encoder": round(rate["encoder"], 2),
        "ratio": round(rate["cache"] / rate["encoder"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
