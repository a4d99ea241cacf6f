"""`cachebind index` on the command line: build with a query file, re-tune from the query log
without rebuilding, list the versions with recall per query set, and refuse a bad query file
with a message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clustered_embeddings import crossmodal_queries
from tables import make_images_table

from cachebind.cli import main
from cachebind.published.querylog import QueryLog, query_log_path
from cachebind.store import CacheTable

DIM = 32


def test_build_tune_and_list_from_the_command_line(tmp_path: Path, capsys) -> None:
    store = make_images_table(tmp_path / "db", 3000, DIM, seed=1)
    index_dir = tmp_path / "index"
    common = ["--table-uri", store.uri, "--index-dir", str(index_dir)]
    table = CacheTable.open(store)
    images = table.vectors(table.ids().tolist())
    np.save(tmp_path / "text.npy", crossmodal_queries(images, 300, "text", seed=3)[0])
    assert main(["index", "build", *common, "--queries", f"text={tmp_path / 'text.npy'}"]) == 0
    out = capsys.readouterr().out
    assert "text:file:text.npy" in out and "image:held_out" in out

    qlog = QueryLog(1000)
    qlog.add("audio", crossmodal_queries(images, 50, "audio", seed=4)[0])
    qlog.save(query_log_path(index_dir))
    assert main(["index", "tune", *common, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["update"]["mode"] == "retuned" and manifest["parent_version"] == "v000001"
    assert {s["name"]: s["trusted"] for s in manifest["query_sets"]} == {
        "image:held_out": True,
        "audio:query_log": False,  # 50 < min_queries_per_set
    }

    assert main(["index", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert "* v000002" in listing and "retuned" in listing
    assert "audio:query_log" in listing and "untrusted" in listing
    assert "text:file:text.npy" in listing  # v000001's sets, under v000001


def test_a_bad_query_file_is_a_message_not_a_traceback(tmp_path: Path, capsys) -> None:
    store = make_images_table(tmp_path / "db", 100, DIM, seed=1)
    np.save(tmp_path / "q.npy", np.zeros((4, DIM + 1), np.float32))
    args = ["index", "--table-uri", store.uri, "--index-dir", str(tmp_path / "index")]
    assert main([*args, "--queries", f"text={tmp_path / 'q.npy'}"]) == 2
    err = capsys.readouterr().err
    assert "q.npy" in err and f"[n, {DIM}]" in err
    assert main([*args, "--queries", "no-equals-sign"]) == 2
    assert "MODALITY=PATH" in capsys.readouterr().err
    assert not (tmp_path / "index" / "versions").exists()


@pytest.mark.parametrize("action", ["tune"])
def test_tune_without_a_published_index_says_so(tmp_path: Path, capsys, action: str) -> None:
    store = make_images_table(tmp_path / "db", 100, DIM, seed=1)
    args = ["index", action, "--table-uri", store.uri, "--index-dir", str(tmp_path / "index")]
    assert main(args) == 2
    assert "build one first" in capsys.readouterr().err
