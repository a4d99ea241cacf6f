"""The serving building blocks on their own: keys, the filter language, the micro-batcher."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pyarrow as pa
import pytest

from cachebind.serve.auth import (
    KeyStore,
    Role,
    create_key,
    hash_key,
    presented_key,
    read_key_file,
    write_key_file,
)
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.filters import FilterError, parse_filter

# --------------------------------------------------------------------------- keys


def test_hash_key_is_sha256_of_the_utf8_key():
    assert hash_key("s3cret") == "sha256:" + hashlib.sha256(b"s3cret").hexdigest()


def test_created_keys_are_stored_hashed_and_recognised(tmp_path):
    path = tmp_path / "keys.txt"
    key = create_key(path)
    other = create_key(path)
    text = path.read_text()
    assert key not in text and other not in text
    assert text.splitlines() == [hash_key(key), hash_key(other)]
    assert path.stat().st_mode & 0o777 == 0o600
    admin = write_key_file(tmp_path / "admin.txt", ["root-key"])
    store = KeyStore.from_files(path, admin)
    assert store.role(key) is Role.USER
    assert store.role("root-key") is Role.ADMIN
    assert store.role(key + "x") is Role.NONE
    assert store.role("") is Role.NONE


def test_key_files_reject_anything_but_sha256_lines(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# users\n\n" + hash_key("a") + "\nplaintext-key\n")
    with pytest.raises(ValueError, match=r"keys.txt:4: expected 'sha256:<64 hex digits>'"):
        read_key_file(path)


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer  abc ", None, "abc"),
        ("Basic abc", None, None),
        (None, "k1", "k1"),
        ("Bearer ", "k1", "k1"),
        (None, None, None),
    ],
)
def test_presented_key(authorization, x_api_key, expected):
    assert presented_key(authorization, x_api_key) == expected


# --------------------------------------------------------------------------- filters

TABLE = pa.table(
    {
        "id": [1, 2, 3, 4],
        "key": ["a", "b", "it's", "d"],
        "caption": ["a dog", "a cat", None, "a Dog on a beach"],
        "width": [50, 200, 300, 120],
        "height": [10, 20, 30, 40],
    }
)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("width > 100", [2, 3, 4]),
        ("width > 100 AND caption LIKE '%dog%'", []),
        ("width > 100 AND caption LIKE '%Dog%'", [4]),
        ("width >= 200 OR caption LIKE 'a dog'", [1, 2, 3]),
        ("NOT (id IN (1, 2))", [3, 4]),
        ("caption IS NULL", [3]),
        ("caption IS NOT NULL AND height BETWEEN 15 AND 40", [2, 4]),
        ("key = 'it''s'", [3]),
        ("key <> 'a' and width < 150", [4]),
        ("caption NOT LIKE '%cat%'", [1, 4]),
        ("width > 100.0 AND id IN (2.0, 4)", [2, 4]),
    ],
)
def test_filter_selects_the_rows_sql_would(text, ids):
    assert TABLE.filter(parse_filter(text)).column("id").to_pylist() == ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vector > 0", "unknown column 'vector'"),
        ("thumbnail IS NULL", "unknown column 'thumbnail'"),
        ("width > 'wide'", "'width' is numeric"),
        ("caption = 3", "'caption' is text"),
        ("width LIKE '1%'", "LIKE needs a text column"),
        ("height BETWEEN 0.5 AND 20", "'height' holds whole numbers"),
        ("width >", "expected a number"),
        ("(width > 1", "expected ')'"),
        ("width 5", "expected an operator"),
        ("id = 1 OR", "expected a column name"),
        ("id = 1; DROP TABLE images", "unexpected character ';'"),
        ("id = 1 --", "unexpected character '-'"),
        ("lower(caption) = 'x'", "unknown column 'lower'"),
        ("   ", "filter is empty"),
        ("NOT " * 40 + "id = 1", "nested deeper"),
        ("id = 1" + " OR id = 1" * 400, "longer than"),
    ],
)
def test_filter_rejects_what_it_does_not_allow_and_says_why(text, message):
    with pytest.raises(FilterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_filter(text)


# --------------------------------------------------------------------------- micro-batcher


def test_concurrent_submissions_share_one_call_and_get_their_own_results():
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [i * i for i in items]

    async def main() -> list[int]:
        batcher = MicroBatcher(square, window_ms=20, max_batch=64)
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.close()

    assert asyncio.run(main()) == [i * i for i in range(10)]
    assert calls == [list(range(10))]


def test_max_batch_splits_and_a_busy_model_grows_the_next_batch():
    calls: list[list[int]] = []

    def slow(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.05)
        return items

    async def main() -> None:
        batcher = MicroBatcher(slow, window_ms=0, max_batch=4)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is now busy with [0]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.gather(first, *rest)
        await batcher.close()

    asyncio.run(main())
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]


def test_an_item_error_fails_only_its_caller_and_a_batch_error_fails_all():
    def fn(items: list[int]) -> list[object]:
        if 99 in items:
            raise RuntimeError("model crashed")
        return [ItemError(ValueError(f"bad {i}")) if i < 0 else i for i in items]

    async def main() -> tuple[list[object], list[object]]:
        batcher = MicroBatcher(fn, window_ms=20, max_batch=8)
        mixed = await asyncio.gather(
            *(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True
        )
        crashed = await asyncio.gather(
            *(batcher.submit(i) for i in (4, 99)), return_exceptions=True
        )
        await batcher.close()
        return mixed, crashed

    mixed, crashed = asyncio.run(main())
    assert mixed[0] == 1 and mixed[2] == 3
    assert isinstance(mixed[1], ValueError) and str(mixed[1]) == "bad -2"
    assert all(isinstance(e, RuntimeError) for e in crashed)


def test_the_model_runs_off_the_event_loop():
    loop_thread: list[int] = []
    model_thread: list[int] = []

    def fn(items: list[int]) -> list[int]:
        model_thread.append(threading.get_ident())
        return items

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        batcher = MicroBatcher(fn, window_ms=1, max_batch=2)
        await batcher.submit(1)
        await batcher.close()

    asyncio.run(main())
    assert model_thread and model_thread[0] != loop_thread[0]


def test_a_lone_request_to_an_idle_model_does_not_wait_for_the_window():
    async def main() -> float:
        batcher = MicroBatcher(lambda items: items, window_ms=120_000, max_batch=8)
        t0 = time.perf_counter()
        await batcher.submit(1)
        elapsed = time.perf_counter() - t0
        await batcher.close()
        return elapsed

    assert asyncio.run(main()) < 60.0  # half the window: it did not wait for it


# --------------------------------------------------------------------------- generation streams


def test_one_decode_step_wakes_the_event_loop_once_for_all_its_streams():
    from cachebind.inject.handles import one_wakeup
    from cachebind.serve.streaming import mailbox_of

    loop = asyncio.new_event_loop()
    wakeups: list[object] = []
    threadsafe = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):  # the only way another thread can wake a loop
        wakeups.append(callback)
        return threadsafe(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

    asked_during_burst: list[int] = []

    def delivery_step(box, queues, n: int) -> None:  # what the scheduler's delivery does
        before = len(wakeups)
        with one_wakeup():
            for q in queues:
                box.post(q, ("piece", f"token {n}"))
            asked_during_burst.append(len(wakeups) - before)

    async def streams() -> None:
        box = mailbox_of(asyncio.get_running_loop())
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(16)]
        for n in range(3):
            step = threading.Thread(target=delivery_step, args=(box, queues, n))
            step.start()
            got = [await asyncio.wait_for(q.get(), 60) for q in queues]
            step.join()
            assert got == [("piece", f"token {n}")] * 16

    try:
        loop.run_until_complete(streams())
    finally:
        loop.close()
    assert asked_during_burst == [0, 0, 0]  # the step's posts wait for its end
    assert len(wakeups) == 3  # one per step, not one per stream and token
