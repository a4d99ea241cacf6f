"""The GPU path's exact search (torch matmul + top-k), run on the CPU here."""

from __future__ import annotations

import faiss
import numpy as np
from clustered_embeddings import clustered_vectors

from cachebind.published.gpu import TorchExactSearch, gpu_wanted


def test_torch_exact_search_matches_faiss_flat() -> None:
    x = clustered_vectors(3_000, 64, seed=0)
    q = clustered_vectors(3_040, 64, seed=0)[3_000:]
    flat = faiss.IndexFlatIP(64)
    flat.add(x)
    expected_scores, expected = flat.search(q, 10)
    torch_search = TorchExactSearch(x, device="cpu", dtype="float32")
    scores, found = torch_search.search(q, 10)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    # Small score blocks: the query block is cut in two and the rows stream in chunks of 70.
    torch_search.QUERY_BLOCK = 20
    torch_search.max_scores = 20 * 70
    chunked_scores, chunked = torch_search.search(q, 10)
    np.testing.assert_array_equal(chunked, expected)
    np.testing.assert_allclose(chunked_scores, expected_scores, atol=1e-5)


def test_torch_exact_search_pads_when_k_exceeds_rows() -> None:
    x = clustered_vectors(4, 16, seed=1)
    scores, found = TorchExactSearch(x, device="cpu", dtype="float32").search(x, 6)
    assert (found[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    np.testing.assert_array_equal(found[:, 0], np.arange(4))


def test_no_gpu_means_cpu_unless_required() -> None:
    if faiss.get_num_gpus() == 0:
        assert gpu_wanted("auto") in (False, True)  # True only with CUDA torch
        assert gpu_wanted("no") is False


def test_loaded_flat_index_batches_through_the_matrix_product(tmp_path) -> None:
    """Batched exact search (torch matmul on the CPU) returns what FAISS's scan returns."""
    from tables import make_images_table

    import indexing
    from cachebind.config import IndexConfig
    from cachebind.store import CacheTable

    store = make_images_table(tmp_path / "db", 2_000, 32, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no")
    indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    loaded = indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    assert loaded._cpu_matmul is not None
    queries = clustered_vectors(2_050, 32, seed=0)[2_000:]
    scores, ids = loaded.search(queries, 10)
    expected_scores, positions = loaded.index.search(queries, 10)
    np.testing.assert_array_equal(ids, loaded.ids[positions])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    single_scores, single = loaded.search(queries[:1], 10)  # the FAISS path
    np.testing.assert_array_equal(single, ids[:1])


def test_the_gpu_search_imports_without_the_build_stack() -> None:
    """A bare GPU machine (torch and faiss, no LanceDB, autofaiss or Ray) can run it."""
    import subprocess
    import sys

    import indexing

    code = (
        "import sys, cachebind.published.gpu; "
        "print([m for m in ('lancedb', 'autofaiss', 'ray', 'indexing.steps.build')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert sorted(indexing.__all__) == sorted(indexing._HOME)  # every export has a home
