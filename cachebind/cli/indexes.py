"""`cachebind index` (build, add, tune, list, verify) and `cachebind store gc`."""

from __future__ import annotations

import argparse
import json
import sys

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings
from cachebind.published.layout import (
    MANIFEST_FILE,
    current_version,
    list_versions,
    versions_dir,
)
from cachebind.published.manifest import Manifest, read_manifest

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
        parents=[common.table, common.index_dir, common.encoder],
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
    p.add_argument(
        "--column",
        dest="index__column",
        metavar="NAME",
        help="the table's vector column to index: vector (ImageBind's, the default) or an "
        "extra encoder's, e.g. vector_dinov2 (embed --extra-encoder); give it its own "
        "--index-dir",
    )
    p.add_argument("--index-version", help="verify: this version instead of CURRENT")
    p.add_argument(
        "--table-version", type=int, help="build/add/tune: this table version, not the latest"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    import indexing

    if args.action == "list":
        return _index_list(settings, args)
    if args.action == "verify":
        version = args.index_version or current_version(settings.index.dir)
        if version is None:
            print(f"no published index in {settings.index.dir}", file=sys.stderr)
            return 1
        problems = indexing.verify_version(settings.index.dir, version)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{version}: every file matches the manifest's sha256")
        return 1 if problems else 0
    from cachebind.store import CacheTable

    query_files = [indexing.parse_query_spec(spec) for spec in args.queries or []]
    options = indexing.BuildOptions(
        progress=not args.no_progress,
        # A build without --shards adds a large table in one Ray task per cluster CPU.
        shards=args.shards if args.shards is not None else "auto" if args.action == "build" else 1,
        ray_address=args.ray_address,
        index_key=args.index_key,
        query_files=query_files,
    )
    table = CacheTable.open(
        settings.store, version=args.table_version, column=settings.index.column
    )
    if args.action == "add":
        from cachebind.store.identity import check_encoder, configured_encoder

        check_encoder(
            configured_encoder(settings.encoder, settings.weights),
            table.metadata,
            f"{settings.store.uri}/{settings.store.table}",
            allow=settings.encoder.allow_mismatch,
        )
        manifest = indexing.add(table, settings.index, options)
    elif args.action == "tune":
        manifest = indexing.tune(table, settings.index, options)
    else:
        manifest = indexing.build(table, settings.index, options)
    # The table version the new index version reads is tagged (kept by every gc); after an
    # `add`, versions the retention no longer needs are removed.
    if args.action == "add":
        print(indexing.collect(settings).summary(), file=sys.stderr)
    else:
        indexing.protect_published(settings.index.dir, settings.store)
    if args.json:
        print(json.dumps(manifest, indent=2, default=str))
        return 0
    _print_published(settings, Manifest.from_json(manifest))
    return 0


def _print_published(settings: Settings, manifest: Manifest) -> None:
    recall = ", ".join(f"recall@{k} {v:.3f}" for k, v in manifest.recall.items())
    latency = ", ".join(
        f"{name.replace('_', ' ')} p50 {v['p50']:.2f} ms p99 {v['p99']:.2f} ms"
        for name, v in manifest.latency_ms.items()
    )
    if manifest.update:
        print(
            f"{manifest.update['mode']} (from {manifest.parent_version}): "
            f"{manifest.update['reason']}"
        )
    if manifest.selection_reason:
        print(f"escalated: {manifest.selection_reason}")
    folder = versions_dir(settings.index.dir) / str(manifest.version)
    print(
        f"published {manifest.version} (CURRENT) in {settings.index.dir}\n"
        f"  index {manifest.index_key} {manifest.search_params} over "
        f"{manifest.table.row_count} rows of table version {manifest.table.version}\n"
        f"  {recall} (worst trusted query set)\n  latency: {latency}\n"
        + "".join(f"  {line}\n" for line in _query_set_lines(manifest))
        + f"  manifest: {folder / MANIFEST_FILE}"
    )


def _query_set_lines(manifest: Manifest) -> list[str]:
    """One line per query set: recall@1/10/100, latency, and whether it is trusted."""
    lines = []
    for s in manifest.query_sets:
        recall = " ".join(f"@{k} {v:.3f}" for k, v in (s.get("recall") or {}).items())
        b1 = (s.get("latency_ms") or {}).get("batch1_p50")
        own = s.get("search_params")
        lines.append(
            f"{s['name']:<28} n={s['n']:<5} recall {recall}"
            + (f"  b1 p50 {b1:.2f} ms" if isinstance(b1, float) else "")
            + (f"  at {own}" if own and own != manifest.search_params else "")
            + ("" if s.get("trusted") else "  (untrusted: too few queries)")
        )
    return lines


def _index_list(settings: Settings, args: argparse.Namespace) -> int:
    current = current_version(settings.index.dir)
    for version in list_versions(settings.index.dir):
        try:
            manifest = read_manifest(settings.index.dir, version)
        except (OSError, ValueError) as e:
            print(f"{version}  (manifest unreadable: {e})")
            continue
        mark = "*" if version == current else " "
        update = (manifest.update or {}).get("mode", "built")
        print(
            f"{mark} {version}  {manifest.index_key} {manifest.search_params}  "
            f"{update}  {manifest.created_at or ''}"
        )
        for line in _query_set_lines(manifest):
            print(f"    {line}")
    return 0


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


def cmd_store(settings: Settings, args: argparse.Namespace) -> int:
    import indexing

    report = indexing.collect(settings, retention_s=args.retention_s, orphans=args.orphans)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
