"""LLaVA-1.5 stage-1 training throughput (samples/s) from cached patch tokens against through the
frozen encoder, the same projector, LLM, batch and step of ``cachebind train llava-pretrain``'s
loop, timed alternately in one run; and the bytes a cached row of tokens takes.

CPU (default, small shapes that run on 2 cores)::

    .venv/bin/python benchmarks/bench_tokens.py

GPU (ImageBind-huge's trunk, a 7B-shaped LLaMA, bf16; random weights)::

    python benchmarks/bench_tokens.py --device cuda --preset huge --llm 7b --batch-size 8

The cached side reads the batch's rows (tokens and captions) from a Lance table written
beforehand in a temporary directory with the loop's reader (``train.rows.RowSource.take``) and
collates them as the loop does (``tokens_data.collate_captions``: the plain conversation); the
read and the collation are timed. The other side runs the encoder's vision pass under
``no_grad`` on preprocessed pixels (decoding is not counted, which flatters it) and the same
captions. Both then take the loop's optimiser step: ``TokensLoss`` (projector -> placed tokens
-> frozen LLM), ``step.optimizer_step`` with the recipe's gradient clipping, AdamW as
``make_tokens_optimizer``, bf16 autocast on a GPU. Ray Train's orchestration (one process per
GPU, the read-ahead) is not part of either side.
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
from cachebind.config import StoreConfig, TokensTrainConfig  # noqa: E402
from cachebind.encode.imagebind import PRESETS, ImageBindModel  # noqa: E402
from cachebind.inject.tiny import train_tokenizer  # noqa: E402
from cachebind.inject.tokenizer import Tokenizer  # noqa: E402
from cachebind.store import CacheTable, images_schema  # noqa: E402
from cachebind.train.rows import RowSource  # noqa: E402
from cachebind.train.step import optimizer_step  # noqa: E402
from cachebind.train.tokens_data import (  # noqa: E402
    IMAGE_INDEX,
    TokensBatch,
    collate_captions,
    pad_examples,
    plain_example,
)
from cachebind.train.tokens_model import (  # noqa: E402
    TokensLoss,
    make_tokens_optimizer,
    set_stage_trainability,
)

LLMS = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, vocab_size=1024),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, vocab_size=32000),
}  # fmt: skip
CAPTION_WORDS = 12  # LLaVA's BLIP captions are short


def write_tokens_table(
    root: Path, tokens: np.ndarray, dim: int, captions: list[str] | None = None
) -> CacheTable:
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
            "caption": pa.array(captions) if captions else pa.nulls(n, pa.string()),
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
    recipe = TokensTrainConfig()
    tmp = tempfile.TemporaryDirectory()
    tok = Tokenizer(train_tokenizer(Path(tmp.name) / "tokenizer.model", vocab_size=512))
    llm_config = LlamaConfig(**LLMS[args.llm], max_position_embeddings=patches + 64)
    with torch.device(device):
        llm = LlamaForCausalLM(llm_config).to(dtype)
        projector = LlavaProjector(width, llm_config.hidden_size)
    module = TokensLoss(projector, llm, IMAGE_INDEX)
    trainable = set_stage_trainability(module, "pretrain")
    optimizer = make_tokens_optimizer(trainable, recipe.pretrain_lr, recipe.weight_decay)
    autocast = torch.bfloat16 if cuda else None

    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, 224, 224, generator=g).to(device=device, dtype=dtype)
    words = torch.randint(0, 1000, (b, CAPTION_WORDS), generator=g).tolist()
    captions = [" ".join(f"w{w}" for w in row) for row in words]

    with torch.no_grad():
        _, fresh = encoder.vision_features_and_tokens(images, -2)
    table = write_tokens_table(Path(tmp.name), fresh.float().cpu().numpy(), 16, captions)
    source = RowSource(
        uri=str(table.dataset.uri), version=int(table.version), columns=("patch_tokens", "caption")
    )
    offsets = np.arange(b)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(batch: TokensBatch) -> None:
        optimizer_step(module, optimizer, [batch.to(device)], autocast, recipe.max_grad_norm)

    def from_cache() -> None:
        rows = source.take(offsets)
        step(collate_captions(tok, rows["patch_tokens"], rows["caption"], patches,
                              recipe.max_length))  # fmt: skip

    def through_encoder() -> None:
        with torch.no_grad():
            _, tokens = encoder.vision_features_and_tokens(images, -2)
        examples = [plain_example(tok, c, patches, recipe.max_length) for c in captions]
        input_ids, labels = pad_examples(examples, tok.sp.unk_id())
        step(TokensBatch(tokens.to(torch.float16), input_ids, labels))

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
