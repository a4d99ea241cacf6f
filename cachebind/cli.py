"""`cachebind`: one subcommand per pipeline stage.

Each subcommand turns its flags into overrides of the one Settings object and hands that object
(or the section it needs) to the stage; the stage modules never see argparse.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebind.config import Settings, load_config
from cachebind.modalities import Modality

EPILOG = (
    "Configuration: --config FILE (TOML, sections as in `cachebind config`), or environment "
    "variables CACHEBIND_<SECTION>__<FIELD>, e.g. CACHEBIND_STORE__URI=/data/lancedb. "
    "Flags beat both."
)

MEDIA_SUFFIXES = {
    Modality.IMAGE: {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"},
    Modality.AUDIO: {".wav", ".flac", ".mp3", ".ogg", ".oga", ".m4a"},
    Modality.VIDEO: {".mp4", ".webm", ".mkv", ".mov", ".avi"},
    Modality.IMU: {".csv", ".npy"},
    Modality.POINT: {".ply", ".pcd", ".xyz", ".pts"},
}


# --------------------------------------------------------------------------- query inputs


def parse_input(spec: str) -> tuple[Modality, str, float]:
    """``MODALITY:VALUE[@WEIGHT]`` or a file path (modality from its suffix).

    ``text:a red circle@0.5``, ``audio:bark.wav``, ``photo.jpg@2``.
    """
    weight = 1.0
    head, sep, tail = spec.rpartition("@")
    if sep and _is_number(tail):
        spec, weight = head, float(tail)
    prefix, sep, value = spec.partition(":")
    if sep and prefix in {m.value for m in Modality}:
        return Modality(prefix), value, weight
    suffix = Path(spec).suffix.lower()
    for modality, suffixes in MEDIA_SUFFIXES.items():
        if suffix in suffixes:
            return modality, spec, weight
    raise argparse.ArgumentTypeError(
        f"cannot tell the modality of {spec!r}: write MODALITY:VALUE, e.g. text:'a dog' or "
        f"audio:bark.wav (modalities: {', '.join(m.value for m in Modality)})"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def query_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The API's input objects for --text/--input flags (media are read here, sent as bytes)."""
    from cachebind.client import input_item

    specs = [(Modality.TEXT, text, 1.0) for text in args.text or []]
    specs += list(args.input or [])
    if not specs:
        raise SystemExit("error: give at least one --text or --input")
    items = []
    for modality, value, weight in specs:
        if modality is Modality.TEXT:
            items.append(input_item(modality, value, weight=weight))
        else:
            path = Path(value)
            if not path.is_file():
                raise SystemExit(f"error: {modality.value} input {value!r} is not a file")
            items.append(input_item(modality, path.read_bytes(), weight=weight))
    return items


# --------------------------------------------------------------------------- commands


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def cmd_weights(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.encode import KNOWN_WEIGHTS, download_weights

    dest = Path(args.dir) if args.dir else settings.weights.dir
    if args.action == "list":
        for name, info in KNOWN_WEIGHTS.items():
            state = "present" if (dest / info.filename).is_file() else "not downloaded"
            print(f"{name}: {info.url} ({info.size / 1e9:.2f} GB, {info.license}) - {state}")
        return 0
    if args.name not in KNOWN_WEIGHTS:
        raise SystemExit(f"error: unknown weights {args.name!r}; known: {sorted(KNOWN_WEIGHTS)}")
    info = KNOWN_WEIGHTS[args.name]
    if args.action == "path":
        print(dest / info.filename)
        return 0
    print(f"{args.name} weights are licensed {info.license}: non-commercial use only.")
    path = download_weights(args.name, dest_dir=dest)
    print(f"saved {path}")
    return 0


def cmd_embed(settings: Settings, args: argparse.Namespace) -> int:
    from jobs.embed import run_embed

    report = run_embed(args.source, settings, limit=args.limit)  # prints its summary
    print(f"report: {report.report_path}")
    return 0


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    import indexing

    if args.action == "list":
        return _index_list(settings, args)
    if args.action == "verify":
        version = args.index_version or indexing.current_version(settings.index.dir)
        if version is None:
            print(f"no published index in {settings.index.dir}", file=sys.stderr)
            return 1
        problems = indexing.verify_version(settings.index.dir, version)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{version}: every file matches the manifest's sha256")
        return 1 if problems else 0
    from indexing.querysets import parse_query_spec

    query_files = [parse_query_spec(spec) for spec in args.queries or []]
    if args.action in ("add", "tune"):
        from cachebind.store import CacheTable

        table = CacheTable.open(settings.store)
        if args.action == "tune":
            manifest = indexing.tune_current(
                settings.index.dir, table, settings.index, query_files=query_files
            )
        else:
            manifest = indexing.add_rows(
                settings.index.dir,
                table,
                settings.index,
                shards=args.shards,
                ray_address=args.ray_address,
                query_files=query_files,
            )
    else:
        manifest = indexing.build_and_publish(
            settings.store,
            settings.index,
            shards=args.shards,
            ray_address=args.ray_address,
            index_key=args.index_key,
            query_files=query_files,
        )
    from indexing.retention import collect, protect_published

    # The table version the new index version reads is tagged (kept by every gc); after an
    # `add`, versions the retention no longer needs are removed.
    if args.action == "add":
        print(collect(settings).summary(), file=sys.stderr)
    else:
        protect_published(settings.index.dir, settings.store)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    recall = ", ".join(f"recall@{k} {v:.3f}" for k, v in manifest["recall"].items())
    latency = ", ".join(
        f"{name.replace('_', ' ')} p50 {v['p50']:.2f} ms p99 {v['p99']:.2f} ms"
        for name, v in manifest.get("latency_ms", {}).items()
    )
    update = manifest.get("update")
    if update:
        print(f"{update['mode']} (from {manifest['parent_version']}): {update['reason']}")
    if manifest.get("selection_reason"):
        print(f"escalated: {manifest['selection_reason']}")
    print(
        f"published {manifest['version']} (CURRENT) in {settings.index.dir}\n"
        f"  index {manifest['index_key']} {manifest['search_params']} over "
        f"{manifest['table']['row_count']} rows of table version {manifest['table']['version']}\n"
        f"  {recall} (worst trusted query set)\n  latency: {latency}\n"
        + "".join(f"  {line}\n" for line in _query_set_lines(manifest))
        + f"  manifest: {Path(settings.index.dir) / 'versions' / manifest['version']}/manifest.json"
    )
    return 0


def _query_set_lines(manifest: dict) -> list[str]:
    """One line per query set: recall@1/10/100, latency, and whether it is trusted."""
    from indexing.manifest import query_sets_of

    lines = []
    for s in query_sets_of(manifest):
        recall = " ".join(f"@{k} {v:.3f}" for k, v in (s.get("recall") or {}).items())
        b1 = (s.get("latency_ms") or {}).get("batch1_p50")
        own = s.get("search_params")
        lines.append(
            f"{s['name']:<28} n={s['n']:<5} recall {recall}"
            + (f"  b1 p50 {b1:.2f} ms" if isinstance(b1, float) else "")
            + (f"  at {own}" if own and own != manifest.get("search_params") else "")
            + ("" if s.get("trusted") else "  (untrusted: too few queries)")
        )
    return lines


def _index_list(settings: Settings, args: argparse.Namespace) -> int:
    import indexing
    from indexing.versions import read_manifest

    current = indexing.current_version(settings.index.dir)
    for version in indexing.list_versions(settings.index.dir):
        try:
            manifest = read_manifest(settings.index.dir, version)
        except (OSError, ValueError) as e:
            print(f"{version}  (manifest unreadable: {e})")
            continue
        mark = "*" if version == current else " "
        update = (manifest.get("update") or {}).get("mode", "built")
        print(
            f"{mark} {version}  {manifest.get('index_key')} {manifest.get('search_params')}  "
            f"{update}  {manifest.get('created_at', '')}"
        )
        for line in _query_set_lines(manifest):
            print(f"    {line}")
    return 0


def cmd_store(settings: Settings, args: argparse.Namespace) -> int:
    from indexing.retention import collect

    report = collect(settings, retention_s=args.retention_s, orphans=args.orphans)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.serve import serve_forever

    serve_forever(settings)
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.serve.auth import create_key

    key = create_key(Path(args.file))
    print(key)
    print(
        f"(its sha256 was appended to {args.file}; the key itself is not stored anywhere)",
        file=sys.stderr,
    )
    return 0


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


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.train.report import print_result
    from cachebind.train.trainer import run_training

    print_result(run_training(settings, args.phase))
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.demo.run import run_demo

    return run_demo(
        settings,
        out=Path(args.out),
        checkpoint=args.checkpoint,
        images=args.images,
        train=args.train,
    )


# --------------------------------------------------------------------------- parser


@dataclass(frozen=True)
class CommonOptions:
    """Parent parsers (argparse ``parents=``) for the options several subcommands share."""

    table: argparse.ArgumentParser  # --table-uri, --table
    encoder: argparse.ArgumentParser  # --preset, --checkpoint
    index_dir: argparse.ArgumentParser  # --index-dir
    query: argparse.ArgumentParser  # --text, --input, --url, --api-key


def _parent(title: str) -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    return parser, parser.add_argument_group(title)


def common_options() -> CommonOptions:
    table, g = _parent("cache table")
    g.add_argument(
        "--table-uri", dest="store__uri", metavar="URI", help="LanceDB location (path or s3://…)"
    )
    g.add_argument(
        "--table", dest="store__table", metavar="NAME", help="table name (default images)"
    )

    encoder, g = _parent("encoder")
    g.add_argument(
        "--preset", dest="encoder__preset", metavar="NAME", help="ImageBind preset (default huge)"
    )
    g.add_argument(
        "--checkpoint",
        dest="encoder__checkpoint",
        metavar="FILE",
        help="ImageBind state-dict file",
    )

    index_dir, g = _parent("index")
    g.add_argument(
        "--index-dir",
        dest="index__dir",
        metavar="DIR",
        help="directory of the published index versions",
    )

    query, g = _parent("query")
    g.add_argument("--text", action="append", help="a text query (repeatable)")
    g.add_argument(
        "--input",
        action="append",
        type=parse_input,
        metavar="[MODALITY:]VALUE[@WEIGHT]",
        help="an input of any modality; several are mixed by weight "
        "(e.g. --input photo.jpg@1 --input audio:rain.wav@0.5)",
    )
    g.add_argument("--url", help="query a running service instead of loading the cache here")
    g.add_argument("--api-key", help="API key for --url (or CACHEBIND_API_KEY)")
    return CommonOptions(table, encoder, index_dir, query)


Subcommands = Any  # argparse's private _SubParsersAction


def command(
    sub: Subcommands,
    name: str,
    func: Callable[..., int],
    help: str,  # noqa: A002 - argparse's own word
    description: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=description, epilog=EPILOG, parents=list(parents)
    )
    p.set_defaults(func=func)
    return p


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
    p.add_argument("--limit", type=int, help="embed at most this many samples")


INDEX_ACTIONS = ["build", "add", "tune", "list", "verify"]


def add_index(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "index",
        cmd_index,
        "build, tune, verify and publish the FAISS index",
        "Choose an index for the table under a memory budget, tune its search parameters to "
        "the recall target on held-out queries, measure recall and latency, and publish it as "
        "a new version (CURRENT switches atomically). `add` adds appended rows to the current "
        "index without retraining; `tune` re-tunes the current version's search parameters on the "
        "latest query log (and captions, --queries files) without rebuilding; `list` shows the "
        "versions with recall per query set; `verify` checks a version's files against the "
        "sha256 sums in its manifest.",
        parents=[common.table, common.index_dir],
    )
    p.add_argument("action", nargs="?", default="build", choices=INDEX_ACTIONS)
    _add_index_build_flags(p)
    _add_index_shard_flags(p)
    p.add_argument(
        "--no-rebuild",
        dest="index__rebuild_when_outgrown",
        action="store_const",
        const=False,
        help="add: add the rows even when the grown table has outgrown the current index",
    )
    p.add_argument(
        "--queries",
        action="append",
        metavar="MODALITY=PATH",
        help="build/add/tune: also tune and verify on these query embeddings (.npy, parquet or "
        "Lance with a 'vector' or 'embedding' column); repeatable",
    )
    p.add_argument("--index-version", help="verify: this version instead of CURRENT")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def _add_index_build_flags(p: argparse.ArgumentParser) -> None:
    """build (and an `add` that has to rebuild): what to build and the targets it is tuned to."""
    p.add_argument("--memory-budget-gb", dest="index__memory_budget_gb", type=float)
    p.add_argument("--recall-target", dest="index__recall_target", type=float)
    p.add_argument("--latency-budget-ms", dest="index__latency_budget_ms", type=float)
    p.add_argument("--keep-versions", dest="index__keep_versions", type=int)
    p.add_argument("--index-key", help="force a FAISS index key instead of choosing one")


def _add_index_shard_flags(p: argparse.ArgumentParser) -> None:
    """Sharded builds in Ray tasks and where their shards are merged."""
    p.add_argument(
        "--shards",
        type=int,
        help="sharded build (and an `add` that has to rebuild): this many shards in Ray tasks",
    )
    p.add_argument("--ray-address", help="Ray cluster for a sharded build (default: local Ray)")
    p.add_argument(
        "--merge-on-disk",
        dest="index__merge_on_disk",
        choices=["auto", "yes", "no"],
        help="sharded IVF build: merge the shards into a memory-mapped index.ivfdata instead of "
        "the driver's RAM (auto: when an in-memory merge would exceed --merge-memory-gb)",
    )
    p.add_argument(
        "--merge-memory-gb",
        dest="index__merge_memory_gb",
        type=float,
        metavar="GB",
        help="driver RAM an in-memory merge may take (default 4)",
    )
    p.add_argument(
        "--shard-dir",
        dest="index__shard_dir",
        metavar="DIR",
        help="on-disk merge: a directory every Ray node sees (shared file system) for the "
        "shards' files (default: through the object store into the index directory)",
    )


def add_store(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "store",
        cmd_store,
        "collect the table's old versions (bounded disk)",
        "`gc`: remove versions of the images, errors and progress tables older than the "
        "retention (store.retention_s) that no published index version uses (those are "
        "tagged and kept), and report the bytes freed. --orphans also removes data files no "
        "version references (fragments of killed tasks): not while a job writes the table.",
        parents=[common.table, common.index_dir],
    )
    p.add_argument("action", choices=["gc"])
    p.add_argument("--retention-s", type=float, help="override store.retention_s")
    p.add_argument("--orphans", action="store_true", help="also remove unreferenced files")
    p.add_argument("--json", action="store_true")


def add_serve(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "serve",
        cmd_serve,
        "run the HTTP service (embed, search, enhance, generate)",
        "Serve the versioned HTTP API (/v1/embed, /v1/search, /v1/enhance, /v1/generate, "
        "/v1/index, /healthz, /readyz, /metrics, OpenAPI at /docs) and the search page at /. "
        "API keys are read hashed from --api-keys-file; new index versions are picked up live.",
        parents=[common.table, common.index_dir, common.encoder],
    )
    p.add_argument("--host", dest="serve__host")
    p.add_argument("--port", dest="serve__port", type=int)
    p.add_argument("--api-keys-file", dest="serve__api_keys_file")
    p.add_argument("--admin-keys-file", dest="serve__admin_keys_file")
    p.add_argument(
        "--no-auth",
        dest="serve__auth",
        action="store_const",
        const=False,
        help="serve without API keys (local experiments only)",
    )


def add_keys(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "keys",
        cmd_keys,
        "create an API key for the service",
        "Generate a random API key, print it once, and append its sha256 to FILE (use the "
        "file as --api-keys-file, or as --admin-keys-file for admin keys).",
    )
    p.add_argument("action", choices=["create"])
    p.add_argument("file", help="keys file to append the hash to")


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


def add_train(sub: Subcommands, common: CommonOptions) -> None:
    from cachebind.train.report import add_flags

    p = command(
        sub,
        "train",
        cmd_train,
        "train ImageBind-LLM from the cache (Ray Train)",
        "pretrain: stage 1 (bind network, prefix queries, gates) on the cache's image features "
        "and captions, without running ImageBind. finetune: stage 2 (norms, biases, LoRA). "
        "DDP on Ray Train; checkpoints every --checkpoint-every steps; re-running the same "
        "command resumes. Writes the released {'model': ...} layout that generate/serve load.",
        parents=[common.table],
    )
    p.add_argument("phase", choices=["pretrain", "finetune"])
    add_flags(p)


def add_weights(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "weights",
        cmd_weights,
        "download and locate model weights",
        "Download official checkpoints (resumable, size and sha256 checked, atomic). "
        "ImageBind weights are licensed CC BY-NC 4.0 (non-commercial).",
    )
    p.add_argument("action", choices=["download", "list", "path"])
    p.add_argument("name", nargs="?", default="imagebind_huge")
    p.add_argument("--dir", help="weights directory (default: weights.dir)")


def add_demo(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "demo",
        cmd_demo,
        "the whole pipeline end to end on generated data",
        "Generate a sample collection, embed it with Ray into LanceDB, build and publish the "
        "index, start the service on 127.0.0.1 and run text, audio and image+audio queries, an "
        "enhancement and a generation through the API.",
    )
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    # Not the encoder's --checkpoint: the demo resolves its weights file itself.
    p.add_argument("--checkpoint", help="imagebind_huge.pth (default: the weights directory)")
    p.add_argument("--images", type=int, default=240, help="generated images (default 240)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train stage 1 from the cache (~1 min CPU), report held-out captions, serve it",
    )


def add_config(sub: Subcommands, common: CommonOptions) -> None:
    command(
        sub,
        "config",
        cmd_config,
        "print the effective configuration",
        "Print the configuration after the file, the environment and defaults are merged.",
    )


# In `cachebind --help` order.
SUBCOMMANDS = (
    add_embed,
    add_index,
    add_store,
    add_serve,
    add_keys,
    add_queries,
    add_train,
    add_weights,
    add_demo,
    add_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachebind",
        description="Build and serve ImageBind feature caches.",
        epilog=EPILOG,
    )
    parser.add_argument("--config", help="TOML configuration file (or CACHEBIND_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    for add in SUBCOMMANDS:
        add(sub, common)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flags named ``section__field`` become Settings overrides."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in vars(args).items():
        if "__" in name and value is not None:
            section, field = name.split("__", 1)
            out.setdefault(section, {})[field] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_config(args.config, **overrides_from(args))
        return args.func(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last word: a message, not a traceback
        import httpx

        from cachebind.client import CachebindAPIError
        from cachebind.errors import CachebindError

        if isinstance(exc, httpx.TransportError):
            print(f"error: cannot reach the service: {exc}", file=sys.stderr)
            return 2
        if not isinstance(exc, CachebindError | CachebindAPIError | OSError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
