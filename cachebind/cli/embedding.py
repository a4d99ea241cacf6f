"""`cachebind embed`: the Ray embedding job."""

from __future__ import annotations

import argparse
from typing import Any

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings


def add_embed(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "embed",
        cmd_embed,
        "embed images from a source into the cache table (Ray job)",
        "Read a source (img2dataset webdataset shards or parquet, an image folder, a parquet "
        "file, or a CC3M TSV joined to an image folder), decode on CPU workers, encode with "
        "ImageBind on GPU actors (CPU when there is none), and write the LanceDB table. "
        "Re-running with the same arguments resumes: each sample is written exactly once. "
        "Bad samples go to the errors table; a JSON report is saved beside the table.",
        parents=[common.table, common.encoder],
    )
    p.add_argument(
        "source",
        help="e.g. /data/cc3m (webdataset dir), shards/{00000..00099}.tar, "
        "images/, items.parquet, cc3m.tsv (with --images-dir)",
    )
    p.add_argument("--vector-dtype", dest="store__vector_dtype", choices=["float16", "float32"])
    p.add_argument(
        "--ray-address",
        "--address",
        dest="embed__ray_address",
        help="join an existing Ray cluster (auto or ray://host:10001)",
    )
    p.add_argument("--batch-size", dest="embed__batch_size", type=int)
    p.add_argument("--num-encoders", dest="embed__num_encoders", type=int)
    p.add_argument(
        "--caption-embeddings",
        dest="embed__caption_embeddings",
        action="store_const",
        const=True,
        help="also store caption text embeddings",
    )
    p.add_argument("--no-thumbnails", dest="embed__thumbnails", action="store_const", const=False)
    p.add_argument(
        "--views",
        dest="embed__views",
        type=int,
        metavar="N",
        help="also cache N augmented views per image (the release's training crop, seeded "
        "per sample): view_vectors [N, d] beside the centre vector, sampled per epoch by "
        "`train`; a table keeps the value it was created with (default 0: none)",
    )
    p.add_argument(
        "--view-set",
        dest="embed__view_set",
        choices=["random-crop", "sphinx"],
        help="which views --views caches: random-crop (default) or sphinx, SPHINX's five "
        "224-px views of the 448-px image (the whole, then its four corners; --views 5)",
    )
    p.add_argument(
        "--tokens",
        dest="embed__tokens",
        action="store_const",
        const=True,
        help="also cache each image's patch tokens (float16, the vision trunk's hidden state "
        "--tokens-layer without CLS) as patch_tokens beside the vector (docs/tokens.md)",
    )
    p.add_argument(
        "--tokens-layer",
        dest="embed__tokens_layer",
        type=int,
        metavar="L",
        help="hidden state whose tokens --tokens caches (default -2, the second-to-last layer)",
    )
    p.add_argument(
        "--extra-encoder",
        dest="embed__extra_encoders",
        action="append",
        metavar="NAME=DIR",
        help="also encode each image with NAME (clip336: CLIP ViT-L/14-336; dinov2: DINOv2) "
        "from its Hugging Face checkpoint directory DIR, as the column vector_NAME (and "
        "patch_tokens_NAME with --tokens); repeatable (docs/tokens.md)",
    )
    p.add_argument("--limit", type=int, help="embed at most this many samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--flush-rows",
        type=int,
        metavar="N",
        help="commit every N rows (default: the job's)",
    )


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.embed import run_embed

    options: dict[str, Any] = {"limit": args.limit, "progress": not args.no_progress}
    if args.flush_rows is not None:
        options["flush_rows"] = args.flush_rows
    report = run_embed(args.source, settings, **options)  # prints its summary
    print(f"report: {report.report_path}")
    return 0
