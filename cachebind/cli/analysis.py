"""`cachebind classify` and `cachebind report`: the analyst's workbench over the cache."""

from __future__ import annotations

import argparse
import json

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings


def add_classify(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "classify",
        cmd_classify,
        "label every cached row by zero-shot text prompts (a side table)",
        "Embed each label's prompts (CLIP's 80 ImageNet templates unless --templates; {} "
        "stands for the label), average and normalise them into class embeddings, and write "
        "every row's best label and cosine (and the top K) to the side table "
        "<table>_labels_<digest of the label set>, which records the labels, templates, "
        "encoder and table version. Re-running resumes: rows already labelled are skipped. "
        "With --truth COLUMN, prints accuracy and the confusion matrix.",
        parents=[common.table, common.encoder],
    )
    p.add_argument("--labels", required=True, metavar="FILE", help="one label a line")
    p.add_argument("--templates", metavar="FILE", help="one prompt template a line, with {}")
    p.add_argument("--top-k", type=int, metavar="K", help="labels kept per row (default 1)")
    p.add_argument("--truth", metavar="COLUMN", help="a ground-truth column of the table")
    p.add_argument(
        "--replace",
        action="store_true",
        help="drop this label set's side table first (to relabel with other templates or K)",
    )
    p.add_argument("--limit", type=int, help="label at most this many new rows (local run)")
    p.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray job, one task per table fragment (large tables)",
    )
    p.add_argument("--ray-address", dest="embed__ray_address", help="join an existing Ray cluster")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_classify(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.analysis.templates import read_lines

    labels = read_lines(args.labels, "labels")
    templates = read_lines(args.templates, "templates") if args.templates else None
    options = {"templates": templates, "top_k": args.top_k, "truth_column": args.truth}
    options["replace"] = args.replace
    if args.ray:
        from jobs.classify import run_classify

        result = run_classify(settings, labels, **options)
    else:
        from cachebind.analysis.zero_shot import classify_table

        result = classify_table(settings, labels, limit=args.limit, **options)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(
        f"{result.name}: labelled {result.labelled} rows of table version "
        f"{result.table_version} ({result.total} in all) in {result.seconds:.1f}s"
    )
    for label, n in sorted(result.label_counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>9}  {label}")
    if result.evaluation is not None:
        ev = result.evaluation
        print(f"accuracy against {ev.column!r}: {ev.accuracy:.4f} over {ev.rows} rows")
        print(ev.confusion.to_string())
    return 0


def add_report(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "report",
        lambda settings, args: args.report_func(settings, args),
        "reports on the cache: `report gap` (the modality gap, before and after the blend)",
        "Reports that measure the collection.",
    )
    reports = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    g = reports.add_parser(
        "gap",
        help="the modality gap of every query set against the image rows",
        description="For every query set the index knows (the table's caption embeddings, "
        "the service's query log per modality, --queries files) against a sample of the "
        "image rows: centroid distance and gap vector, the top-1 similarity distribution "
        "and, for captions, the cosine to the paired image; the same after the cache blend "
        "(eq. 4 with cache.k, cache.t, cache.alpha). Writes gap.html (self-contained), "
        "gap.json and the plots as PNG files.",
        parents=[common.table, common.index_dir],
    )
    g.set_defaults(report_func=cmd_report_gap)
    g.add_argument(
        "--queries",
        action="append",
        metavar="MODALITY=FILE",
        help="query embeddings (.npy, .parquet or .lance, as `index build --queries`)",
    )
    g.add_argument(
        "--out",
        help="output folder (default <index.dir>/gap_report, where the web page reads it)",
    )
    g.add_argument("--k", dest="cache__k", type=int, help="neighbours of the blend")
    g.add_argument("--t", dest="cache__t", type=float, help="softmax temperature of the blend")
    g.add_argument("--alpha", dest="cache__alpha", type=float, help="cache weight of the blend")


def cmd_report_gap(settings: Settings, args: argparse.Namespace) -> int:
    import indexing
    from cachebind.analysis.notebook import gap_report
    from cachebind.store import CacheTable

    files = [indexing.parse_query_spec(spec) for spec in args.queries or []]
    cfg = settings.analysis
    table = CacheTable.open(settings.store)
    groups = indexing.known_query_groups(
        table, settings.index.dir, files, cfg.gap_queries, cfg.seed
    )
    from cachebind.analysis.gap_report import REPORT_DIR

    out = args.out or settings.index.dir / REPORT_DIR
    report = gap_report(settings, groups, out_dir=out)
    print(report.numbers_frame().to_string(index=False))
    for name, path in sorted(report.paths.items()):
        print(f"{name}: {path}")
    return 0


def add_map(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "map",
        cmd_map,
        "compute the 2-D map of the collection (UMAP or PCA) for the page and notebooks",
        "Fit a 2-D layout (UMAP, cosine, or PCA) on a seeded sample of the table "
        "(analysis.map_sample rows), place every row by it in batches, and store the "
        "positions as <table>_map_v<version>, the table version they describe, with the "
        "fitted model (which places queries on the map). A stopped run started again "
        "resumes. With --ray, the row ranges are placed as Ray tasks. The web page draws "
        "the map of the served version.",
        parents=[common.table],
    )
    p.add_argument("--method", dest="analysis__map_method", choices=["umap", "pca"])
    p.add_argument("--sample", dest="analysis__map_sample", type=int, metavar="N")
    p.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray job, one task per analysis.map_partition_rows rows (large tables)",
    )
    p.add_argument("--ray-address", dest="embed__ray_address", help="join an existing Ray cluster")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_map(settings: Settings, args: argparse.Namespace) -> int:
    if args.ray:
        from jobs.map import run_map

        result = run_map(settings)
    else:
        from cachebind.analysis.map_run import compute_map

        result = compute_map(settings)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        resumed = "" if result.placed == result.rows else f" ({result.placed} by this run)"
        print(
            f"{result.name}: {result.rows} rows placed{resumed} by {result.method} fitted on "
            f"{result.sample} in {result.seconds:.1f}s"
        )
    return 0
