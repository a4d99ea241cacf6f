"""Specification of in-flight batching: concurrent requests share the decoder's steps and each
gets exactly the tokens it gets alone; joining, leaving, cancelling and deadlines change nothing
for the others; the queue is bounded; the KV cache is checked against memory at start-up.

"Alone" is ``Generator.generate`` with the one prompt (the independent path: a DynamicCache,
one full prefill) and the scheduler with no other request. Batched matmuls may round the last
bits of a logit differently on a CPU, so equality is asserted on tokens and text, not logits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachebind.errors import GenerationBusy, InputError
from cachebind.inject import Generator, build_tiny_llm
from cachebind.inject.model import AdapterLlamaConfig
from cachebind.inject.prompts import format_prompt
from cachebind.inject.scheduler import GenerationTimeout, Scheduler
from cachebind.inject.slots import KVMemoryError, SlotCache, decode_mask, pad_groups

PROMPTS = [
    "Describe the image.",
    "What is this?",
    "A red car near the river and two dogs playing in the snow.",
    "Two people sitting under a tree",
    "What sound is there",
]


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Generator:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-sched"), seed=0)


@pytest.fixture(scope="module")
def scheduler(gen) -> Scheduler:
    # A small prefill chunk, so that the longer prompts take several steps to join.
    sched = Scheduler(gen, max_batch=4, max_queue=16, prefill_chunk=8)
    yield sched
    sched.close()


def wait_until(condition, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def requests(n: int) -> list[dict]:
    """Different prompts, visual queries (one text-only) and lengths."""
    visual = unit(n, 1024, seed=3)
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "visual": None if i % 3 == 2 else visual[i],
            "max_new_tokens": 12 + 7 * i,
        }
        for i in range(n)
    ]


def alone(gen: Generator, req: dict, **sampling) -> str:
    return gen.generate([req["prompt"]], req["visual"], req["max_new_tokens"], **sampling)[0]


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9}],
    ids=["greedy", "seeded-sampling"],
)
def test_concurrent_requests_get_exactly_what_each_gets_alone(gen, scheduler, sampling):
    reqs = requests(6)  # more than max_batch: two wait in the queue and join as rows leave
    seeds = [{"seed": 100 + i} if sampling["temperature"] else {} for i in range(len(reqs))]
    expected = [alone(gen, r, **sampling, **s) for r, s in zip(reqs, seeds, strict=True)]
    solo = []
    for r, s in zip(reqs, seeds, strict=True):
        handle = scheduler.submit(**r, **sampling, **s)
        solo.append(("".join(handle), list(handle.tokens)))
    handles = [scheduler.submit(**r, **sampling, **s) for r, s in zip(reqs, seeds, strict=True)]
    texts = ["".join(h) for h in handles]
    assert texts == expected
    assert [list(h.tokens) for h in handles] == [tokens for _, tokens in solo]
    assert len({t for t in texts}) > 1  # the rows really differ


def test_a_request_joining_and_one_cancelled_mid_flight_change_nothing_for_the_others(
    gen, scheduler
):
    reqs = [{**r, "max_new_tokens": 40} for r in requests(3)]
    expected = [scheduler.submit(**r, temperature=0.0, ignore_eos=True) for r in reqs]
    expected = [("".join(h), h.tokens) for h in expected]

    first = scheduler.submit(**reqs[0], temperature=0.0, ignore_eos=True)
    doomed = scheduler.submit(**reqs[1], temperature=0.0, ignore_eos=True)
    wait_until(lambda: len(first.tokens) >= 5 and len(doomed.tokens) >= 3)
    joiner = scheduler.submit(**reqs[2], temperature=0.0, ignore_eos=True)
    wait_until(lambda: len(joiner.tokens) >= 2)
    at_cancel = len(doomed.tokens)
    doomed.cancel()
    assert "".join(first) == expected[0][0] and first.tokens == expected[0][1]
    assert "".join(joiner) == expected[2][0] and joiner.tokens == expected[2][1]
    list(doomed)  # ends without an error
    assert doomed.finish_reason == "cancelled"
    assert len(doomed.tokens) <= at_cancel + 1  # freed at the next step
    assert doomed.tokens == expected[1][1][: len(doomed.tokens)]


class Recorder:
    """A SchedulerObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.states: list[tuple[int, int]] = []
        self.reasons: list[str] = []
        self.ttft: list[float] = []
        self.n_tokens = 0

    def scheduler_state(self, queued: int, running: int) -> None:
        self.states.append((queued, running))

    def first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def tokens(self, n: int) -> None:
        self.n_tokens += n

    def finished(self, reason: str) -> None:
        self.reasons.append(reason)


def test_a_full_queue_refuses_with_a_retry_hint_and_a_cancel_frees_the_slot_in_one_step(gen):
    seen = Recorder()
    sched = Scheduler(gen, max_batch=1, max_queue=1, prefill_chunk=64, observer=seen)
    try:
        running = sched.submit("Describe the image.", max_new_tokens=400, ignore_eos=True)
        wait_until(lambda: len(running.tokens) >= 2)
        waiting = sched.submit("What is this?", max_new_tokens=4, temperature=0.0)
        with pytest.raises(GenerationBusy) as busy:
            sched.submit("One too many", max_new_tokens=4)
        assert busy.value.retry_after_s >= 1
        wait_until(lambda: seen.states[-1] == (1, 1))
        at_cancel = len(running.tokens)
        running.cancel()
        wait_until(lambda: running.finish_reason is not None)
        # The next step saw the cancel: at most the token of the step under way was added, and
        # the freed slot went to the waiting request.
        assert len(running.tokens) <= at_cancel + 1
        assert "".join(waiting) and waiting.finish_reason in ("eos", "length")
        wait_until(lambda: seen.states[-1] == (0, 0))
        assert seen.reasons.count("cancelled") == 1 and len(seen.ttft) == 2
        assert seen.n_tokens == len(running.tokens) + len(waiting.tokens)
    finally:
        sched.close()


def test_a_request_past_its_deadline_ends_with_a_timeout(scheduler):
    handle = scheduler.submit("Describe the image.", max_new_tokens=400, timeout_s=0.2)
    with pytest.raises(GenerationTimeout):
        "".join(handle)
    assert handle.finish_reason == "error"
    # The scheduler carries on with the next request.
    assert "".join(scheduler.submit("Hello", max_new_tokens=3, temperature=0.0)) is not None


def test_bad_requests_are_refused_at_submission(scheduler):
    with pytest.raises(InputError, match="out_of_range"):
        scheduler.submit("x", temperature=-1)
    with pytest.raises(InputError, match="wrong_shape"):
        scheduler.submit("x", np.zeros(3, dtype=np.float32))
    with pytest.raises(InputError, match="not_finite"):
        scheduler.submit("x", np.full(1024, np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="too_long"):
        scheduler.submit("dog " * 2000)


def test_a_kv_cache_larger_than_memory_is_refused_at_start_up(gen):
    with pytest.raises(KVMemoryError, match="lower llm.max_batch"):
        Scheduler(gen, max_batch=10**7)


def test_zero_gates_in_a_batch_still_equal_plain_llama(tmp_path: Path):
    g = build_tiny_llm(tmp_path, seed=2)
    with torch.no_grad():
        for layer in g.model.llm.model.layers:
            layer.self_attn.gate.zero_()
    sched = Scheduler(g, max_batch=4, prefill_chunk=16)
    try:
        visual = unit(3, 1024, seed=9)
        handles = [
            sched.submit(p, visual[i], max_new_tokens=16, temperature=0.0)
            for i, p in enumerate(PROMPTS[:3])
        ]
        plain = [g.generate([p], None, 16, temperature=0.0)[0] for p in PROMPTS[:3]]
        assert ["".join(h) for h in handles] == plain
    finally:
        sched.close()


def test_a_vanishing_temperature_samples_greedily_and_costs_nobody_else_anything(gen, scheduler):
    # logits / 1e-300 overflows float32: unshifted, the softmax was NaN and the multinomial's
    # error ended every generation of the batch, other clients' included.
    reqs = requests(3)
    others = [scheduler.submit(**r, temperature=0.0, ignore_eos=True) for r in reqs[:2]]
    tiny = [
        scheduler.submit(**reqs[2], temperature=t, seed=7, ignore_eos=True)
        for t in (1e-300, 5e-324)
    ]
    greedy = alone(gen, reqs[2], temperature=0.0, ignore_eos=True)
    assert ["".join(h) for h in tiny] == [greedy, greedy]
    assert alone(gen, reqs[2], temperature=1e-300, seed=7, ignore_eos=True) == greedy
    assert ["".join(h) for h in others] == [
        alone(gen, r, temperature=0.0, ignore_eos=True) for r in reqs[:2]
    ]
    # A huge temperature is as good as uniform, and finite too.
    assert "".join(scheduler.submit("Hello", max_new_tokens=4, temperature=1e308, seed=1))


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 11}],
    ids=["greedy", "seeded-sampling"],
)
@pytest.mark.parametrize("visual", [True, False], ids=["visual-joiner", "text-joiner"])
def test_a_row_that_joins_while_others_decode_gets_the_tokens_it_gets_alone(
    gen, scheduler, sampling, visual
):
    reqs = requests(3)  # a visual row, a text-only row, and the joiner's prompt
    reqs[1]["visual"] = None
    joiner = {**reqs[2], "max_new_tokens": 30}
    joiner["visual"] = unit(1, 1024, seed=21)[0] if visual else None
    expected = alone(gen, joiner, **sampling, ignore_eos=True)
    lone = scheduler.submit(**joiner, **sampling, ignore_eos=True)
    assert "".join(lone) == expected
    # Every row advances one token per step, so rows with 300 to go outlast the joiner's
    # prefill and 30 tokens: it joins and leaves while they decode, whatever the machine's pace.
    running = [
        scheduler.submit(r["prompt"], r["visual"], max_new_tokens=300, ignore_eos=True)
        for r in reqs[:2]
    ]
    wait_until(lambda: all(len(h.tokens) >= 3 for h in running))
    late = scheduler.submit(**joiner, **sampling, ignore_eos=True)
    assert "".join(late) == expected
    assert late.tokens == lone.tokens
    assert [h.finish_reason for h in running] == [None, None]
    for h in running:
        h.cancel()
        list(h)


def test_a_cancelled_row_frees_its_slot_and_its_cache_memory_at_the_next_step(gen):
    sched = Scheduler(gen, max_batch=2, max_queue=2, prefill_chunk=64)
    try:
        allocated = sched.cache.nbytes
        assert sched.kv_bytes_in_use == 0 and sched.running == 0
        doomed = sched.submit("Describe the image.", max_new_tokens=400, ignore_eos=True)
        other = sched.submit("What is this?", max_new_tokens=400, ignore_eos=True)
        wait_until(lambda: len(doomed.tokens) >= 2 and len(other.tokens) >= 2)
        assert sched.kv_bytes_in_use == 2 * sched.cache.slot_nbytes
        at_cancel = len(doomed.tokens)
        doomed.cancel()
        assert list(doomed) is not None and doomed.finish_reason == "cancelled"
        # Freed by the first step that began after the cancel: at most the token of the step
        # under way was added, and only the other row's slot holds cache memory now.
        assert len(doomed.tokens) <= at_cancel + 1
        assert sched.running == 1
        assert sched.kv_bytes_in_use == sched.cache.slot_nbytes
        # Its slot is the next request's, in the same preallocated memory: nothing grew.
        joiner = sched.submit("Hello", max_new_tokens=3, temperature=0.0)
        assert "".join(joiner) == gen.generate(["Hello"], None, 3, temperature=0.0)[0]
        other.cancel()
        list(other)
        wait_until(lambda: sched.running == 0)
        assert sched.kv_bytes_in_use == 0 and sched.cache.nbytes == allocated
    finally:
        sched.close()


def test_text_prompts_sharing_the_template_reuse_its_cache_and_still_get_their_lone_tokens(gen):
    sched = Scheduler(gen, max_batch=2, max_queue=4, prefill_chunk=16)
    try:
        prompts = ["Describe the image.", "What is this?", "Two people sitting under a tree"]
        expected = [gen.generate([p], None, 12, temperature=0.0)[0] for p in prompts]
        first = sched.submit(prompts[0], max_new_tokens=12, temperature=0.0)
        assert "".join(first) == expected[0]
        assert sched.prefix.reused_tokens == 0  # nothing stored before the first prompt
        later = [sched.submit(p, max_new_tokens=12, temperature=0.0) for p in prompts[1:]]
        assert ["".join(h) for h in later] == expected[1:]
        head = len(gen.tokenizer.encode(format_prompt(""), bos=True)) // 2
        assert sched.prefix.reused_tokens >= 2 * head  # each took the template's head
        # A visual row neither gives nor takes: its K and V depend on its own visual query.
        before = sched.prefix.reused_tokens
        visual = unit(1, 1024, seed=5)[0]
        seen = sched.submit(prompts[1], visual, max_new_tokens=12, temperature=0.0)
        assert "".join(seen) == gen.generate([prompts[1]], visual, 12, temperature=0.0)[0]
        assert sched.prefix.reused_tokens == before
    finally:
        sched.close()


def test_text_prompts_arriving_together_prefill_the_template_once_and_get_their_lone_tokens(gen):
    sched = Scheduler(gen, max_batch=3, max_queue=4, prefill_chunk=16)
    try:
        prompts = ["Describe the image.", "What is this?", "Two people sitting under a tree"]
        expected = [gen.generate([p], None, 10, temperature=0.0)[0] for p in prompts]
        handles = [sched.submit(p, max_new_tokens=10, temperature=0.0) for p in prompts]
        assert ["".join(h) for h in handles] == expected
        # The first stores the template as it finishes; the others waited for it instead of
        # prefilling it again beside it.
        head = len(gen.tokenizer.encode(format_prompt(""), bos=True)) // 2
        assert sched.prefix.reused_tokens >= 2 * head
    finally:
        sched.close()


def test_a_steps_prefill_chunks_are_split_so_that_padding_stays_under_its_share():
    lengths = [95, 8, 95, 9, 40, 95, 1]
    groups = pad_groups(lengths, waste=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        width = max(lengths[i] for i in group)
        real = sum(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * width * 0.75 <= real
    assert {0, 2, 5} <= set(groups[0])  # the long prompts share one forward, the short
    assert not {1, 3, 6} & set(groups[0])  # ones another: 95 columns each would be waste
    assert pad_groups([7, 7, 7], waste=0.0) == [[0, 1, 2]]
    assert pad_groups([], waste=0.25) == []


def test_a_decode_step_attends_over_a_view_of_the_slots_up_to_the_longest_row_not_a_copy():
    cfg = AdapterLlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, ffn_hidden=64)
    cache = SlotCache(cfg, max_batch=4, max_seq_len=64, dtype=torch.float32, device="cpu")
    seen = torch.tensor([9, 3, 63])  # slot 2 is idle: it writes at the last position
    cache.bind_decode(3, seen, kv_len=10)
    new_k, new_v = torch.randn(3, 4, 1, 8), torch.randn(3, 4, 1, 8)
    k, v = cache.update(new_k, new_v, layer_idx=1)
    assert k.shape == v.shape == (3, 4, 10, 8)
    assert k.data_ptr() == cache.k[1].data_ptr() and v.data_ptr() == cache.v[1].data_ptr()
    assert torch.equal(k[0, :, 9], new_k[0, :, 0]) and torch.equal(k[1, :, 3], new_k[1, :, 0])
    mask = decode_mask(torch.tensor([9, 3, 0]), kv_len=10)
    assert mask.shape == (3, 1, 1, 10) and mask.dtype == torch.bool
    assert mask[1, 0, 0].tolist() == [True] * 4 + [False] * 6


class _ChunkLog(Scheduler):
    """The scheduler as it is, noting the chunk lengths of each prefill forward."""

    def __init__(self, *args, **kwargs) -> None:
        self.forwards: list[list[int]] = []
        super().__init__(*args, **kwargs)

    def _prefill_forward(self, chunks) -> None:
        self.forwards.append([n for _, _, n in chunks])
        super()._prefill_forward(chunks)


def test_long_and_short_prompts_in_one_step_prefill_in_separate_forwards_and_get_lone_tokens(
    gen,
):
    sched = _ChunkLog(gen, max_batch=4, max_queue=4, prefill_chunk=1024)
    try:
        list(sched.submit("Describe the image.", max_new_tokens=2))  # stores the template
        visual = unit(2, 1024, seed=31)
        reqs = [
            {"prompt": PROMPTS[0], "visual": visual[0], "max_new_tokens": 8},
            {"prompt": PROMPTS[1], "visual": None, "max_new_tokens": 8},
            {"prompt": PROMPTS[2], "visual": visual[1], "max_new_tokens": 8},
            {"prompt": PROMPTS[3], "visual": None, "max_new_tokens": 8},
        ]
        expected = [alone(gen, r, temperature=0.0) for r in reqs]
        sched.forwards.clear()
        handles = [sched.submit(**r, temperature=0.0) for r in reqs]
        assert ["".join(h) for h in handles] == expected
        # Whatever steps the four were admitted in, no forward padded a text row's few
        # remaining tokens to a whole visual prompt's length.
        for lengths in sched.forwards:
            assert len(lengths) * max(lengths) * 0.75 <= sum(lengths) or len(lengths) == 1
        assert max(n for lengths in sched.forwards for n in lengths) > 4 * min(
            n for lengths in sched.forwards for n in lengths
        )  # long and short prompts did prefill here
    finally:
        sched.close()
