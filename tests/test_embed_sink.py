"""The distributed sink's exactly-once rule, on real Lance fragments and a real table: blocks as
encoder actors emit them (rows written as fragments, descriptors sent on), including the
replays a retried task produces and a key repeated across partitions inside one batch."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from cachebind.config import EmbedConfig, EncoderConfig, Settings, StoreConfig
from cachebind.sources import Partition
from cachebind.store import CacheWriter, connect, images_schema, row_id
from cachebind.store.gc import collect_store
from jobs.embed.decode import STAGE_SCHEMA
from jobs.embed.fragments import FragmentTarget, write_block
from jobs.embed.report import EmbedReport
from jobs.embed.sink import PartitionState, Sink

DIM = 4


def encoded(rows: list[tuple[str, str]], done: list[tuple[str, int]] = ()) -> pa.Table:
    """An encoder actor's output: ``ok`` rows (key, partition) and partition markers."""
    records = [
        {"id": row_id(k), "key": k, "caption": f"c {k}", "url": None, "width": 1, "height": 1,
         "shard": shard, "status": "ok", "count": 0, "decode_s": 0.0}
        for k, shard in rows
    ] + [
        {"id": row_id(f"{shard}#done"), "key": "", "shard": shard, "status": "done",
         "count": count, "decode_s": 0.0, "node": "n1"}
        for shard, count in done
    ]  # fmt: skip
    table = pa.Table.from_pylist(records, schema=STAGE_SCHEMA).drop_columns(["pixels"])
    # A vector that says which partition the row came from.
    values = np.repeat([float(s[-1]) for _, s in rows] + [0.0] * len(done), DIM)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float32)), DIM)
    table = table.append_column("vector", vectors)
    return table.append_column("encode_s", pa.array(np.zeros(table.num_rows)))


def test_replayed_and_repeated_rows_are_committed_once(tmp_path: Path) -> None:
    settings = Settings(
        encoder=EncoderConfig(preset="tiny"),
        store=StoreConfig(uri=str(tmp_path / "db")),
        embed=EmbedConfig(sink="workers", thumbnails=False),
    )
    writer = CacheWriter(settings.store, images_schema(dim=DIM, thumbnail=False))
    target = FragmentTarget(writer.images_uri, writer.schema, None, "float16", False, False)
    parts = {p: Partition(id=p, kind="webdataset", uri=f"/x/{p}") for p in ("p0", "p1")}
    report = EmbedReport(source="s", uri=settings.store.uri, table="images", encoder={})
    sink = Sink(writer, settings, report, {p: PartitionState() for p in parts}, parts)

    batches = [
        encoded([("k0", "p0"), ("k1", "p0"), ("k2", "p0"), ("k3", "p0")]),
        # A retried decode task replays k2, k3 beside new rows: committed as a rewrite.
        encoded([("k2", "p0"), ("k4", "p1"), ("k3", "p0"), ("k5", "p1")]),
        encoded([("k0", "p0"), ("k1", "p0")]),  # all replays: never committed
        # k6 in both partitions in one batch: p0 keeps it, p1's is a duplicate_key error; the
        # file holds the id twice, so the rewrite goes by position.
        encoded([("k6", "p0"), ("k6", "p1")], done=[("p0", 5)]),
        encoded([("k0", "p1")], done=[("p1", 4)]),  # p1 repeats p0's k0: an error only
    ]
    blocks = [write_block(b, target) for b in batches]
    assert all(b.nbytes < 2000 for b in blocks)  # descriptors, not rows
    sink.take(blocks[0])
    sink.flush()  # k0..k3 committed: the replays below are recognised by the writer's ids
    for block in blocks[1:]:
        sink.take(block)
    sink.flush()

    rows = connect(settings.store).open_table("images").to_arrow()
    keys = rows["key"].to_pylist()
    assert sorted(keys) == [f"k{i}" for i in range(7)]  # every sample once
    assert len(set(rows["id"].to_pylist())) == rows.num_rows == 7
    k6 = keys.index("k6")
    assert rows["shard"][k6].as_py() == "p0"
    np.testing.assert_array_equal(rows["vector"][k6].values.to_numpy(), np.zeros(DIM))
    assert (sink.ledger.rewritten, sink.ledger.dropped) == (2, 2)
    errors = (
        connect(settings.store).open_table(settings.store.errors_table_name).to_arrow().to_pylist()
    )
    assert sorted((e["key"], e["shard"], e["reason"]) for e in errors) == [
        ("k0", "p1", "duplicate_key"),
        ("k6", "p1", "duplicate_key"),
    ]
    assert set(writer.finished_partitions()) == {"p0", "p1"}
    assert report.rows_written == 7 and report.partitions_finished == 2

    # The uncommitted fragments are orphan files: gc with orphans removes exactly those.
    data = Path(writer.images_uri) / "data"
    before = {p.name for p in data.iterdir()}
    live = {f.path for frag in lance.dataset(writer.images_uri).get_fragments()
            for f in frag.metadata.files}  # fmt: skip
    assert len(before - live) == 4  # two rewritten originals, two dropped
    collect_store(settings.store, retention_s=0.0, orphans=True)
    assert {p.name for p in data.iterdir()} == live
    assert connect(settings.store).open_table("images").count_rows() == 7
