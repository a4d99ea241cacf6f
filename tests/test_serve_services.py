"""The service layer on its own: each service's request type, batch function and batcher, over a
real LanceDB table and an exact FAISS index (no server)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import weakref
from collections.abc import Callable

import numpy as np
import pytest
from builders import TableFlatLoader, append_rows, build_demo_cache

from cachebind.config import ServeConfig
from cachebind.serve.batching import MicroBatcher
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import IndexSnapshot
from cachebind.serve.services import (
    EnhanceQuery,
    EnhanceService,
    GenerationRequest,
    SearchQuery,
    SearchService,
)
from cachebind.serve.services.enhance import enhance_batch
from cachebind.serve.services.search import search_batch

# A bound on every wait for a state below: far above what the work takes on a loaded machine,
# only there so that a broken batcher fails the test instead of hanging it.
STATE_WAIT_S = 60.0


async def until(condition: Callable[[], object], what: str) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded by ``STATE_WAIT_S``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STATE_WAIT_S
    while not condition():
        assert loop.time() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.001)


@pytest.fixture
def snapshot(tmp_path) -> IndexSnapshot:
    cache = build_demo_cache(tmp_path, rows=120, dim=32, seed=3)
    return TableFlatLoader(cache.store).load()


def unit_queries(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- request types


@pytest.mark.parametrize(
    ("request_type", "field", "args"),
    [
        (SearchQuery, "k", (None, np.zeros(4, np.float32), 5, ("image",))),
        (EnhanceQuery, "alpha", (None, np.zeros(4, np.float32), 5, 20.0, 0.5, ("image",))),
        (GenerationRequest, "temperature", ("Describe the image.",)),
    ],
)
def test_a_request_type_is_frozen_so_a_queued_request_cannot_change_under_its_batch(
    request_type: type, field: str, args: tuple[object, ...]
) -> None:
    request = request_type(*args)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(request, field, 1)


def test_a_generation_request_hands_the_scheduler_only_its_options_none_meaning_the_default():
    request = GenerationRequest("Hi", None, max_new_tokens=7, stop=("\n",), template=False)
    assert request.options() == {
        "max_new_tokens": 7,
        "temperature": None,
        "top_p": None,
        "seed": None,
        "stop": ("\n",),
        "template": False,
    }


# --------------------------------------------------------------------------- batch functions


def test_a_search_batch_answers_each_query_as_the_index_answers_it_alone(
    snapshot: IndexSnapshot,
) -> None:
    queries = unit_queries(4, 32, seed=11)
    ks = [1, 7, 3, 7]
    out = search_batch(
        [SearchQuery(snapshot, q, k, ("image",)) for q, k in zip(queries, ks, strict=True)]
    )
    for (scores, ids), q, k in zip(out, queries, ks, strict=True):
        alone_scores, alone_ids = snapshot.index.search(q[None, :], k, ["image"])
        assert np.array_equal(ids, alone_ids[0])
        assert np.allclose(scores, alone_scores[0], atol=1e-5)  # inner products of unit vectors


def test_a_search_batch_that_straddles_an_index_swap_answers_each_query_on_its_own_version(
    tmp_path,
) -> None:
    cache = build_demo_cache(tmp_path, rows=60, dim=32, seed=5)
    loader = TableFlatLoader(cache.store)
    old = loader.load()
    append_rows(cache, 60, seed=6)
    new = loader.load()
    assert (old.rows, new.rows) == (60, 120)
    queries = unit_queries(6, 32, seed=12)
    snaps = [old, new, old, new, new, old]
    out = search_batch(
        [SearchQuery(s, q, 60, (None,)) for s, q in zip(snaps, queries, strict=True)]
    )
    # k = 60 ranks every row of the old version: its queries all see the same 60 ids.
    old_ids = set(out[0][1].tolist())
    assert len(old_ids) == 60
    for (_, ids), snap in zip(out, snaps, strict=True):
        found = set(ids.tolist())
        assert len(found) == 60 and -1 not in found
        if snap is old:
            assert found == old_ids
        else:  # ranked over the 120 rows of the new version, not only the old 60
            assert not found <= old_ids


def test_an_enhance_batch_of_mixed_settings_answers_each_query_as_the_cache_model_alone(
    snapshot: IndexSnapshot,
) -> None:
    queries = unit_queries(5, 32, seed=13)
    settings = [(3, 20.0, 0.5), (5, 20.0, 0.5), (3, 5.0, 0.5), (3, 20.0, 0.1), (3, 20.0, 0.5)]
    out = enhance_batch(
        [
            EnhanceQuery(snapshot, q, k, t, alpha, ("image",))
            for q, (k, t, alpha) in zip(queries, settings, strict=True)
        ]
    )
    for got, q, (k, t, alpha) in zip(out, queries, settings, strict=True):
        [alone] = snapshot.cache.enhance(q[None, :], k, t, alpha, ["image"])
        assert len(got.ids) == k and np.array_equal(got.ids, alone.ids)
        # Unit vectors: float32 rounding of the blend is relative to 1.
        assert np.allclose(got.embedding, alone.embedding, atol=1e-5)


# --------------------------------------------------------------------------- services


def test_the_search_service_pages_through_its_batcher_to_the_exact_top_rows(
    snapshot: IndexSnapshot,
) -> None:
    query = unit_queries(1, 32, seed=14)[0]
    service = SearchService(ServeConfig(), Metrics())

    async def main():
        try:
            return await service.page(
                snapshot,
                query,
                ("image",),
                need=8,
                where=None,
                dedup=None,
                max_widenings=3,
                max_candidates=1000,
            )
        finally:
            await service.close()

    page = asyncio.run(main())
    _, ids = snapshot.index.search(query[None, :], 8, ["image"])
    assert [h.id for h in page.hits] == ids[0].tolist()
    assert not page.partial


def test_concurrent_enhance_requests_share_one_batch_and_each_gets_its_own_answer(
    snapshot: IndexSnapshot,
) -> None:
    queries = unit_queries(6, 32, seed=15)
    # A window no request can outlast: the batch closes on max_batch, not on time.
    config = ServeConfig(batch_window_ms=600_000, max_batch=len(queries))
    service = EnhanceService(config, Metrics())
    sizes: list[int] = []
    service.batcher.on_batch = sizes.append

    async def main():
        try:
            requests = [EnhanceQuery(snapshot, q, 4, 20.0, 0.5, (None,)) for q in queries]
            return await asyncio.gather(*(service.enhance(r) for r in requests))
        finally:
            await service.close()

    answers = asyncio.run(main())
    # All six are queued before the collector first runs (one event loop, no thread yet), and
    # max_batch closes the batch: one call of the cache model for all of them.
    assert sizes == [len(queries)]
    for got, q in zip(answers, queries, strict=True):
        [alone] = snapshot.cache.enhance(q[None, :], 4, 20.0, 0.5, [None])
        assert np.array_equal(got.ids, alone.ids)


# --------------------------------------------------------------------------- micro-batcher


def test_a_running_batch_is_held_by_its_batcher_until_it_is_done():
    # The event loop keeps only weak references to tasks: a batch task that nothing else
    # holds may be collected mid-run, and its callers would wait forever.
    release = threading.Event()

    def blocked(items: list[int]) -> list[int]:
        release.wait(STATE_WAIT_S)
        return items

    async def main() -> None:
        batcher = MicroBatcher(blocked, window_ms=0, max_batch=4)
        try:
            caller = asyncio.ensure_future(batcher.submit(1))
            await until(lambda: batcher.running, "a batch running")
            [task] = batcher.running
            ref = weakref.ref(task)
            del task
            gc.collect()
            running = ref()
            assert running is not None and not running.done()
            del running
            release.set()
            assert await caller == 1
            await until(lambda: not batcher.running, "the finished batch let go")
        finally:
            release.set()
            await batcher.close()

    asyncio.run(main())
