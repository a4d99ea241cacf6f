"""Specification of the cache model: mixing, retrieval (eq. 3) and the released blend (eq. 4)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from cachebind.cache import CacheModel, FaissNeighbours, blend, mix, normalize
from cachebind.cache.model import softmax_weights


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_cache(vectors: np.ndarray, ids: np.ndarray) -> FaissNeighbours:
    """A real exact inner-product FAISS index keyed by table ids, holding the vectors."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids.astype(np.int64))
    return FaissNeighbours(index)


def released_forward_visual_knn(f_m: np.ndarray, protos: np.ndarray, sims: np.ndarray, t, alpha):
    """The knn branch of the released ``forward_visual``, transcribed in torch."""
    f = torch.tensor(f_m, dtype=torch.float64)
    sims = (torch.tensor(sims, dtype=torch.float64) * t).softmax(dim=-1)
    feats = (sims.unsqueeze(1) @ torch.tensor(protos, dtype=torch.float64)).squeeze(1)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    out = (1 - alpha) * f + alpha * feats
    return (out / out.norm(dim=-1, keepdim=True)).numpy()


class CountingIndex(FaissNeighbours):
    def __init__(self, index) -> None:
        super().__init__(index.index)
        self.searches = 0
        self.fetches = 0

    def search(self, queries, k):
        self.searches += 1
        return super().search(queries, k)

    def vectors(self, ids):
        self.fetches += 1
        return super().vectors(ids)


def test_mix_is_weighted_sum_of_normalised_inputs_not_renormalised():
    a = np.array([3.0, 0.0, 0.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 0.0, 0.5, 0.0], dtype=np.float32)
    out = mix([a, b], [1.0, 3.0])
    expected = np.array([1 / (4 + 1e-6), 0.0, 3 / (4 + 1e-6), 0.0], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Two orthogonal unit inputs mixed equally have norm ~0.707: the released code keeps it.
    assert np.linalg.norm(mix([a, b], [1, 1])) == pytest.approx(np.sqrt(0.5), rel=1e-5)


def test_mix_of_one_input_is_that_input_normalised_batch_shapes_kept():
    x = random_unit(5, 16, 0) * 7.0
    np.testing.assert_allclose(mix([x], [2.0]), normalize(x) * 2 / (2 + 1e-6), rtol=1e-6)


@pytest.mark.parametrize(
    "embeddings, weights, message",
    [
        ([], [], "at least one"),
        ([np.ones(4)], [1.0, 2.0], "1 embeddings but 2 weights"),
        ([np.ones(4), np.ones(5)], [1.0, 1.0], "differ in shape"),
        ([np.ones(4)], [-1.0], "non-negative"),
    ],
)
def test_mix_rejects_bad_input(embeddings, weights, message):
    with pytest.raises(ValueError, match=message):
        mix(embeddings, weights)


def test_blend_matches_released_formula():
    f_m = random_unit(4, 32, 1) * 0.8  # an un-normalised mix, as forward_visual may pass
    protos = random_unit(4 * 10, 32, 2).reshape(4, 10, 32)
    sims = np.einsum("nd,nkd->nk", f_m, protos)
    for t, alpha in [(20.0, 0.5), (100.0, 0.5), (5.0, 0.2), (20.0, 1.0)]:
        got = blend(f_m, protos, sims, t, alpha)
        want = released_forward_visual_knn(f_m, protos, sims, t, alpha)
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("t", [1e308, 1e-300])
def test_extreme_temperatures_still_give_weights_that_sum_to_one(t):
    # t · S in float32 overflowed past ~3e38: every weight was 0 and the blend lost S_topk.
    sims = np.array([[0.5, 0.4, 0.1, -np.inf], [0.3, 0.3, 0.1, 0.0]], np.float32)
    weights = softmax_weights(sims, t)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    if t > 1:  # the limit of a sharp softmax: all weight on the best (shared when tied)
        np.testing.assert_allclose(weights, [[1, 0, 0, 0], [0.5, 0.5, 0, 0]], atol=1e-6)
    else:  # the limit of a flat one: the finite entries share it equally
        np.testing.assert_allclose(weights, [[1 / 3] * 3 + [0], [0.25] * 4], atol=1e-6)


def test_blend_alpha_zero_is_the_query_and_padding_gets_no_weight():
    f_m = random_unit(2, 8, 3)
    protos = random_unit(6, 8, 4).reshape(2, 3, 8)
    sims = np.einsum("nd,nkd->nk", f_m, protos)
    np.testing.assert_allclose(blend(f_m, protos, sims, 20.0, 0.0), f_m, atol=1e-6)
    padded_sims = np.concatenate([sims, np.full((2, 2), -np.inf, np.float32)], axis=1)
    padded_protos = np.concatenate([protos, np.zeros((2, 2, 8), np.float32)], axis=1)
    np.testing.assert_allclose(
        blend(f_m, padded_protos, padded_sims, 20.0, 0.5),
        blend(f_m, protos, sims, 20.0, 0.5),
        atol=1e-6,
    )


def test_enhance_retrieves_exact_top_k_and_blends_as_released():
    keys = random_unit(500, 64, 5)
    table_ids = np.arange(500, dtype=np.int64) * 7 + 1000  # table ids are not positions
    cache = CacheModel(faiss_cache(keys, table_ids))
    queries = random_unit(3, 64, 6)
    out = cache.enhance(queries, k=10, t=20.0, alpha=0.5)
    assert len(out) == 3
    for q, enh in zip(queries, out, strict=True):
        sims = keys @ q
        order = np.argsort(-sims)[:10]
        np.testing.assert_array_equal(enh.ids, table_ids[order])
        np.testing.assert_allclose(enh.similarities, sims[order], atol=1e-5)
        weights = torch.tensor(sims[order] * 20.0).softmax(-1).numpy()
        np.testing.assert_allclose(enh.weights, weights, atol=1e-5)
        want = released_forward_visual_knn(q[None], keys[order][None], sims[order][None], 20, 0.5)
        np.testing.assert_allclose(enh.embedding, want[0], atol=2e-6)
        assert enh.embedding.dtype == np.float32


def test_enhance_is_batched_one_search_and_one_fetch():
    keys = random_unit(200, 16, 7)
    index = CountingIndex(faiss_cache(keys, np.arange(200)))
    cache = CacheModel(index)
    queries = np.concatenate([keys[:5], keys[:5]])  # repeats: neighbours fetched once
    batch = cache.enhance(queries, k=4)
    assert (index.searches, index.fetches) == (1, 1)
    singles = [cache.enhance(q, k=4)[0] for q in queries]
    for a, b in zip(batch, singles, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)


def test_enhance_with_fewer_rows_than_k_uses_the_rows_there_are():
    keys = random_unit(3, 16, 8)
    cache = CacheModel(faiss_cache(keys, np.array([10, 11, 12])))
    (enh,) = cache.enhance(random_unit(1, 16, 9), k=10)
    assert sorted(enh.ids.tolist()) == [10, 11, 12]
    assert enh.weights.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.isfinite(enh.embedding))


def test_enhance_on_an_empty_cache_returns_the_normalised_query():
    cache = CacheModel(faiss_cache(np.zeros((0, 16), np.float32), np.zeros(0)))
    q = random_unit(1, 16, 10) * 0.5
    (enh,) = cache.enhance(q, k=5)
    assert enh.ids.size == 0 and enh.weights.size == 0
    np.testing.assert_allclose(enh.embedding, normalize(q)[0], atol=1e-6)


def test_values_come_from_the_table_when_one_is_given():
    keys = random_unit(50, 16, 11)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))  # search only: cannot reconstruct by id
    index.add_with_ids(keys, np.arange(50, dtype=np.int64))

    class Table:  # same contract as CacheTable.vectors: exact vectors by table id
        def vectors(self, ids):
            return keys[np.asarray(ids)]

    cache = CacheModel(FaissNeighbours(index), Table())
    (enh,) = cache.enhance(keys[3], k=3, alpha=1.0, t=1000.0)
    assert enh.ids[0] == 3
    np.testing.assert_allclose(enh.embedding, keys[3], atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"t": 0.0}, "t .* must be > 0"),
        ({"t": float("nan")}, "t .* must be > 0"),
        ({"alpha": 1.5}, "alpha .* must be in"),
        ({"alpha": -0.1}, "alpha .* must be in"),
    ],
)
def test_enhance_validates_parameters(kwargs, message):
    keys = random_unit(10, 8, 12)
    cache = CacheModel(faiss_cache(keys, np.arange(10)))
    with pytest.raises(ValueError, match=message):
        cache.enhance(keys[:1], **kwargs)


def test_similarities_come_from_exact_values_even_over_a_compressed_index():
    """A PQ index scores approximately; S_topk (and so the softmax weights) must not."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(2000, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    pq = faiss.index_factory(32, "IVF16,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    pq.train(base)
    pq.add(base)
    pq.nprobe = 16
    exact = faiss.IndexFlatIP(32)
    exact.add(base)

    class PQWithExactValues:
        def search(self, q, k):
            return pq.search(q, k)

        def vectors(self, ids):
            return base[np.asarray(ids)]

    query = base[:3] + 0.05 * rng.normal(size=(3, 32)).astype(np.float32)
    approx_scores, _ = pq.search(query, 5)
    out = CacheModel(PQWithExactValues()).enhance(query, k=5)
    for i, e in enumerate(out):
        np.testing.assert_allclose(e.similarities, base[e.ids] @ query[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(approx_scores[0], out[0].similarities, atol=1e-3)
