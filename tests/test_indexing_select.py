"""Index selection: exact search for small caches, autofaiss's quantized key on a tight budget."""

from __future__ import annotations

import pytest
from autofaiss.external.optimize import get_optimal_index_keys_v2

from indexing.steps.select import FLAT_MAX_ROWS, nb_lists, select_index


def test_small_tables_get_exact_flat_search() -> None:
    sel = select_index(FLAT_MAX_ROWS - 1, 1024, 16.0)
    assert sel.key == "Flat"
    assert sel.train_size == 0
    assert sel.device == "cpu"


def test_tables_that_fit_the_budget_get_ivf_fast_scan_with_exact_rerank() -> None:
    sel = select_index(1_000_000, 1024, 16.0)
    assert sel.key == f"IVF{nb_lists(1_000_000)},PQ256x4fs,RFlat"
    # autofaiss was asked and its answer recorded, with the reason it was not taken.
    assert sel.autofaiss_keys[0].startswith("HNSW")
    assert "HNSW" in sel.reason
    assert 0 < sel.train_size <= 1_000_000


def test_budget_limited_tables_get_autofaiss_quantized_key() -> None:
    # 1M x 1024 float32 is 3.8 GiB: a 2 GiB budget forces compression.
    sel = select_index(1_000_000, 1024, 2.0)
    proposed = get_optimal_index_keys_v2(1_000_000, 1024, f"{2 * 2**30}B")
    assert sel.key == proposed[0]
    assert sel.key.startswith("OPQ") and "IVF" in sel.key and "PQ" in sel.key
    assert sel.train_size > 0


def test_memory_budget_is_respected_by_the_quantized_key() -> None:
    # 3.3M x 1024 (CC3M) under 1 GiB: PQ codes of at most ~1 GiB / 3.3M ~ 325 bytes with ids.
    sel = select_index(3_300_000, 1024, 1.0)
    pq_bytes = int(sel.key.rsplit("PQ", 1)[1].split("x")[0])
    assert (pq_bytes + 8) * 3_300_000 <= 2**30


def test_cache_that_fits_the_gpu_gets_exact_fp16_search_on_it() -> None:
    sel = select_index(3_300_000, 1024, 16.0, gpu_memory_bytes=80 * 10**9)
    assert (sel.key, sel.device) == ("Flat", "gpu")
    # Too big for the GPU: back to the CPU/IVF choice.
    sel = select_index(50_000_000, 1024, 512.0, gpu_memory_bytes=80 * 10**9)
    assert sel.key != "Flat" and "IVF" in sel.key


def test_impossible_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="memory_budget_gb"):
        select_index(100_000_000, 1024, 0.001)
