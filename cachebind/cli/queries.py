"""`cachebind search / enhance / generate`: a query of any modality, here or against --url."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cachebind.cli.options import CommonOptions, Subcommands, command, query_items
from cachebind.config import Settings


def add_queries(sub: Subcommands, common: CommonOptions) -> None:
    """search, enhance, generate: a query of any modality, here or against --url."""
    p = command(
        sub,
        "search",
        cmd_search,
        "cross-modal search of the cache",
        "Encode a query of any modality (or a weighted mix) and print its nearest cached "
        "images with captions and cosine scores.",
        parents=[common.query],
    )
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--filter", help='SQL-style filter on metadata, e.g. "width >= 200"')
    p.add_argument("--json", action="store_true")

    p = command(
        sub,
        "enhance",
        cmd_enhance,
        "cache-enhanced embedding F~_M of a query",
        "Blend the query embedding with its top-k cached neighbours "
        "(F~_M = normalize((1-alpha) F_M + alpha F_cache)) and show which neighbours drove it.",
        parents=[common.query],
    )
    p.add_argument("-k", type=int, default=None, help="neighbours (default 10)")
    p.add_argument("-t", type=float, default=None, help="softmax temperature (default 20)")
    p.add_argument("--alpha", type=float, default=None, help="blend weight (default 0.5)")
    p.add_argument("--json", action="store_true")

    p = command(
        sub,
        "generate",
        cmd_generate,
        "generate text with LLaMA conditioned on a cache-enhanced query",
        "Encode the inputs, enhance them with the cache, inject the result into every LLaMA "
        "layer through the zero-initialised gates, and stream the answer.",
        parents=[common.query],
    )
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--llama-dir", dest="llm__llama_dir")
    p.add_argument("--adapter-checkpoint", dest="llm__adapter_checkpoint")


def _client(settings: Settings, args: argparse.Namespace) -> Any:
    import os

    from cachebind.client import CachebindClient

    if args.url:
        key = args.api_key or os.environ.get("CACHEBIND_API_KEY")
        return CachebindClient(args.url, api_key=key)
    return CachebindClient.in_process(settings)


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings, args) as client:
        result = client.search(query_items(args), k=args.k, filter=args.filter)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for rank, hit in enumerate(result["results"], 1):
        print(f"{rank:3d}. {hit['score']:.4f}  {hit['key']}  {hit.get('caption') or ''}")
    return 0


def cmd_enhance(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings, args) as client:
        result = client.enhance(query_items(args), k=args.k, t=args.t, alpha=args.alpha)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"cosine(F_M, F~_M) = {result['cosine_to_query']:.4f}")
    for n in result["neighbours"]:
        caption = n.get("caption") or ""
        print(f"  weight {n['weight']:.3f}  sim {n['similarity']:.4f}  {n['key']}  {caption}")
    return 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    with _client(settings, args) as client:
        for piece in client.generate(
            args.prompt,
            query_items(args) if (args.text or args.input) else [],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        ):
            print(piece, end="", flush=True)
    print()
    return 0
