"""In-flight (continuous) batching: one thread owns the model and decodes every running request
in each step; a second thread (``inject.delivery``) turns the tokens into text for the callers.

A request waits in a bounded queue, takes a free slot of the preallocated KV cache
(``inject.slots``), has its prompt prefilled in chunks of at most ``prefill_chunk`` tokens per
step (so a long prompt delays the running rows by one chunk per step, not by its whole length),
then joins the batched decode step. It leaves on EOS, its token budget, a stop string, a cancel
or its deadline, and its slot is free for the next request at the next step.

A decode step costs the same bookkeeping whatever the batch: the slots' last tokens,
positions, adapter terms and sampling settings stay on the device (``SlotInputs``) and are
written only when a row joins or leaves; the inputs, the mask and the advance of every row are
a handful of tensor operations over slots 0 … highest decoding slot; the whole batch is sampled
in one call (``sampling.sample_rows``: only a sampled row's draw uses its own generator); the
step ends with one list of new tokens handed to the delivery thread, which detokenises and wakes
each event loop once for all its streams.

Each row is computed as it would be alone: its own slot (BOS at position 0, no left padding),
its own positions and mask, its own adapter terms from T_I = bind(F~_M), computed once when it
joins (or none: a text-only row's are zeros, as alone it has none), and its own temperature, top_p
and ``torch.Generator`` seeded per request. What differs from a lone run is only the shape of
the matmuls, which on a CPU may change the last bits of a logit; tokens stay equal unless two
logits tie to those bits (the tests compare tokens).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cachebind.config import (
    PREFILL_CHUNK,
    PREFILL_PAD_WASTE,
    RELEASED_MAX_NEW_TOKENS,
    RELEASED_TEMPERATURE,
    RELEASED_TOP_P,
)
from cachebind.errors import InputError
from cachebind.inject.delivery import Delivery, DeliveryThread, ended, text_of
from cachebind.inject.generate import Generator, check_sampling
from cachebind.inject.handles import (
    GenerationHandle,
    GenerationTimeout,
    NullObserver,
    SchedulerBusy,
    SchedulerObserver,
    Sink,
)
from cachebind.inject.llava_serve import TokensGenerator
from cachebind.inject.prefix import PrefixCache, common_prefix
from cachebind.inject.sampling import sample_rows
from cachebind.inject.slots import (
    SlotCache,
    SlotInputs,
    check_kv_memory,
    decode_mask,
    pad_groups,
    prefill_inputs,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    handle: GenerationHandle
    ids: list[int]
    f_m: torch.Tensor | None  # F~_M [bind_in_dim] (None: text only)
    temperature: float
    top_p: float
    rng: torch.Generator
    budget: int
    stop: tuple[str, ...]
    ignore_eos: bool
    deadline: float | None
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0
    ready: bool = False  # prompt prefilled and a first token sampled: decodes each step
    emitted: str = ""
    # tanh(gate) · W_v(T_I + prefix_query) per adapted layer [L, 1, 1, dim], on admission
    terms: torch.Tensor | None = None
    images: Any = None  # tokens mode: the prompt's images (``llava_serve.PromptImages``)
    embeds: torch.Tensor | None = None  # tokens mode: the prompt's input embeddings [S, dim]

    @property
    def position(self) -> int:  # where the last sampled token goes when it is fed
        return len(self.ids) + len(self.handle.tokens) - 1


class Scheduler:
    """Owns ``generator``'s model in one thread and batches all requests' decode steps.

    ``max_batch`` slots of ``max_seq_len`` positions are allocated at start-up (checked against
    the device's free memory first); at most ``max_queue`` requests wait for a slot.
    """

    def __init__(
        self,
        generator: Generator | TokensGenerator,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        max_seq_len: int | None = None,
        threads: int | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1")
        model = generator.model
        self.generator = generator
        self.model = model
        self.tokenizer = generator.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len or generator.max_seq_len
        check_kv_memory(
            model.cfg, max_batch, self.max_seq_len, model.dtype, model.device, spare_slots=1
        )
        self.cache = SlotCache(model.cfg, max_batch, self.max_seq_len, model.dtype, model.device)
        self.prefix = PrefixCache(self.cache)
        self.inputs = SlotInputs(
            max_batch, model.cfg.dim, model.cfg.query_layer, model.dtype, model.device
        )
        self.delivery = DeliveryThread(self.tokenizer, observer or NullObserver())
        self.steps = 0  # steps done (each: leavers, joiners, one decode, one prefill chunk)
        self._outbox: list[Delivery] = []  # this step's deliveries, handed over at its end
        self._visual_slots: set[int] = set()
        # torch's intra-op thread count is per thread (OpenMP's nthreads ICV): the scheduler's
        # own thread gets the creating thread's setting explicitly rather than whatever OpenMP
        # gives a new thread.
        self.threads = threads or torch.get_num_threads()
        self._slots: list[_Row | None] = [None] * max_batch
        self._queue: deque[_Row] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._request_s = 1.0  # moving mean of a request's time in a slot (for Retry-After)
        self._thread = threading.Thread(target=self._run, name="cachebind-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side

    def submit(
        self,
        prompt: str,
        visual: torch.Tensor | np.ndarray | None = None,
        *,
        max_new_tokens: int = RELEASED_MAX_NEW_TOKENS,
        temperature: float = RELEASED_TEMPERATURE,
        top_p: float = RELEASED_TOP_P,
        seed: int | None = None,
        template: bool = True,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        timeout_s: float | None = None,
        sink: Sink | None = None,
        images: Any = None,
    ) -> GenerationHandle:
        """Queue one request; raises ``InputError`` on bad input, ``SchedulerBusy`` when full.

        ``images`` (tokens mode): the prompt's images, whose visual tokens stand at its
        image-token positions; the row is prefilled from input embeddings."""
        check_sampling(temperature, top_p, max_new_tokens)
        ids = self.generator.prompt_ids(prompt, template=template, images=images)
        if images is not None:
            self.generator.check_images(images)
        if len(ids) >= self.max_seq_len:
            raise InputError(
                "prompt", "too_long", f"{len(ids)} tokens; the limit is {self.max_seq_len - 1}"
            )
        f_m = self._features(visual)
        seed = seed if seed is not None else self.generator.seed
        rng = torch.Generator(device=self.model.device)
        rng.manual_seed(seed) if seed is not None else rng.seed()
        handle = GenerationHandle(sink)
        handle.prompt_tokens = len(ids)
        row = _Row(
            handle,
            ids,
            f_m,
            temperature,
            top_p,
            rng,
            budget=min(max_new_tokens, self.max_seq_len - len(ids)),
            stop=tuple(s for s in stop if s),
            ignore_eos=ignore_eos,
            deadline=None if timeout_s is None else time.monotonic() + timeout_s,
            images=images,
        )
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._queue) >= self.max_queue and None not in self._slots:
                waits = (len(self._queue) + 1) / self.max_batch
                raise SchedulerBusy(len(self._queue), max(1, math.ceil(waits * self._request_s)))
            self._queue.append(row)
            self._cv.notify()
        return handle

    @property
    def observer(self) -> SchedulerObserver:
        """Where the load is reported (the scheduler's thread and the delivery's)."""
        return self.delivery.observer

    @observer.setter
    def observer(self, observer: SchedulerObserver) -> None:
        self.delivery.observer = observer

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of the KV cache that the running requests' slots hold (the rest is free)."""
        return self.cache.slot_nbytes * self.running

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._slots)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.delivery.close()

    def _features(self, visual: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        if visual is None:
            return None
        if self.generator.visual_dim is None:
            raise InputError(
                "visual", "unsupported", f"the {self.generator.mode} mode takes no feature F~_M"
            )
        f = torch.as_tensor(np.asarray(visual, dtype=np.float32)).float().reshape(-1)
        if f.shape[0] != self.generator.visual_dim:
            raise InputError(
                "visual", "wrong_shape", f"expected {self.generator.visual_dim} features"
            )
        if not torch.isfinite(f).all():
            raise InputError("visual", "not_finite", "visual features contain NaN or inf")
        return f

    # ------------------------------------------------------------------ the model's thread

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self._queue and self.running == 0:
                        self._cv.wait()
                    if self._closed:
                        break
                try:
                    self._step()
                except Exception as exc:  # the model failed: every running row hears it
                    log.exception("generation step failed")
                    for row in self._slots:
                        if row is not None:
                            self._free(row, exc)
                self.delivery.post(self._outbox)
                self._outbox = []
                self.steps += 1
                self.observer.scheduler_state(self.queued, self.running)
        closed = RuntimeError("the scheduler was closed")
        for row in [*self._slots, *self._queue]:
            if row is not None:
                self._outbox.append(ended(row.handle, closed))
        self.delivery.post(self._outbox)

    def _step(self) -> None:
        now = time.monotonic()
        for row in self._slots:  # leavers free their slot before anyone computes
            if row is None:
                continue
            if row.handle.cancelled.is_set():
                self._free(row, "cancelled")
            elif row.deadline is not None and now > row.deadline:
                self._free(row, GenerationTimeout("the generation passed its deadline"))
        self._admit()
        decoding = [r for r in self._slots if r is not None and r.ready]
        if decoding:
            self._decode(decoding)
        self._prefill()

    def _admit(self) -> None:
        joined = []
        with self._cv:
            while self._queue and None in self._slots:
                row = self._queue.popleft()
                if row.handle.cancelled.is_set():
                    self._outbox.append(ended(row.handle, "cancelled"))
                    continue
                row.slot = self._slots.index(None)  # lowest free: keeps the batch short
                self._slots[row.slot] = row
                joined.append(row)
        # Outside the lock: a submitter (an event loop) never waits on a joiner's model work.
        for row in joined:
            if row.f_m is not None:  # the adapter's side of every step, once per row
                row.terms = self.model.adapter_terms(self.model.visual_query(row.f_m[None]))
                self._visual_slots.add(row.slot)
            elif row.images is not None:  # its K and V depend on its images: no reuse
                try:
                    row.embeds = self.generator.prompt_embeds(row.ids, row.images)
                except Exception as exc:  # this row's images alone: the batch goes on
                    log.exception("visual tokens of a prompt failed")
                    self._free(row, exc)
                    continue
                finally:
                    row.images = None
            self.inputs.join(row.slot, row.terms, row.temperature, row.top_p, row.ignore_eos)

    def _prefill(self) -> None:
        """At most ``prefill_chunk`` prompt tokens this step, oldest request first, the
        joining rows' chunks in as few forwards as keep padding under PREFILL_PAD_WASTE
        (chunks of one forward are left-padded so each row's last token is last)."""
        budget = self.prefill_chunk
        waiting = sorted(
            (r for r in self._slots if r is not None and not r.ready), key=lambda r: r.submitted
        )
        chunks: list[tuple[_Row, int, int]] = []
        for k, row in enumerate(waiting):
            if budget <= 0:
                break
            if row.prefilled == 0 and row.terms is None and row.embeds is None:
                if self._shares_more_with(row, waiting[:k]):
                    continue  # it would compute again what an older row is computing
                # The stored prefix as it is when the row starts, not when it was admitted:
                # rows that arrived together find the template that the first of them stored.
                row.prefilled = self.prefix.reuse(row.slot, row.ids)
            n = min(budget, len(row.ids) - row.prefilled)
            chunks.append((row, row.prefilled, n))
            budget -= n
        for group in pad_groups([n for _, _, n in chunks], PREFILL_PAD_WASTE):
            self._prefill_forward([chunks[i] for i in group])

    def _shares_more_with(self, row: _Row, older: list[_Row]) -> bool:
        """Whether an older text row still prefilling, whose prompt the prefix cache will
        store, shares more of ``row``'s prompt than the stored one does: ``row`` then waits
        for it (a step or a few), rather than prefill the same positions a second time."""
        stored = common_prefix(self.prefix.ids, row.ids)
        return any(
            o.terms is None
            and o.embeds is None
            and common_prefix(o.ids, row.ids) > stored
            and self.prefix.would_store(o.ids)
            for o in older
        )

    def _prefill_forward(self, chunks: list[tuple[_Row, int, int]]) -> None:
        """One forward over (row, start, length) chunks; rows whose prompt it completes
        sample their first token."""
        device = self.model.device
        width = max(n for _, _, n in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
        for i, (row, start, n) in enumerate(chunks):
            ids[i, width - n :] = torch.tensor(row.ids[start : start + n], device=device)
        starts, lengths = [c[1] for c in chunks], [c[2] for c in chunks]
        positions, mask = prefill_inputs(starts, lengths, device)
        terms = self._terms_of([row for row, _, _ in chunks])
        embeds = self._embeds_of(chunks, ids)
        self.cache.bind_prefill([row.slot for row, _, _ in chunks], starts, lengths)
        out = self.model(
            ids,
            terms=terms,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            logits_to_keep=1,
            **({} if embeds is None else {"inputs_embeds": embeds}),
        )
        done = []
        for i, (row, _, n) in enumerate(chunks):
            row.prefilled += n
            if row.prefilled == len(row.ids):
                done.append(i)
                if row.terms is None and row.embeds is None:
                    self.prefix.offer(row.slot, row.ids)
                row.embeds = None
        if not done:
            return
        rows = [chunks[i][0] for i in done]
        slots = torch.tensor([r.slot for r in rows], device=device)
        _, tokens, bad = sample_rows(
            out.logits[done, -1],
            self.inputs.temperature[slots],
            self.inputs.top_p[slots],
            self.inputs.ignore_eos[slots],
            [self._generator_of(r) for r in rows],
            self.tokenizer.eos_id,
        )
        for row, token, is_bad in zip(rows, tokens, bad, strict=True):
            row.ready = True
            row.handle.first_token_s = time.perf_counter() - row.submitted
            self.observer.first_token(row.handle.first_token_s)
            if self._take(row, token, is_bad):
                self.inputs.start(row.slot, token, row.position)
        eos = self.tokenizer.eos_id
        self.observer.tokens(sum(not b and t != eos for t, b in zip(tokens, bad, strict=True)))

    def _terms_of(self, rows: list[_Row]) -> torch.Tensor | None:
        """The prefill rows' adapter terms [L, b, 1, dim] (None: no row has a visual query)."""
        if all(r.terms is None for r in rows):
            return None
        slots = torch.tensor([r.slot for r in rows], device=self.model.device)
        return self.inputs.terms[:, slots]

    def _embeds_of(
        self, chunks: list[tuple[_Row, int, int]], ids: torch.Tensor
    ) -> torch.Tensor | None:
        """Input embeddings of the left-padded chunks [b, width, dim] when a row has visual
        tokens in its prompt (None: the ids are fed): its own embeddings, the others' ids'."""
        if all(row.embeds is None for row, _, _ in chunks):
            return None
        embeds = self.model.embed(ids)
        width = ids.shape[1]
        for i, (row, start, n) in enumerate(chunks):
            if row.embeds is not None:
                embeds[i, width - n :] = row.embeds[start : start + n]
        return embeds

    def _generator_of(self, row: _Row) -> torch.Generator | None:
        return row.rng if row.temperature > 0 else None

    def _decode(self, rows: list[_Row]) -> None:
        """One token for every ready row, in one forward over slots 0 … highest ready slot."""
        width = max(r.slot for r in rows) + 1
        tokens, write_at, see = self.inputs.decode_inputs(width, self.max_seq_len - 1)
        kv_len = max(r.position for r in rows) + 1
        self.cache.bind_decode(width, write_at, kv_len)
        # Text-only batches skip the adapter; in a mixed one a text row's terms are zeros
        # (x + 0.0 is exact), as alone it has none.
        visual = any(s < width for s in self._visual_slots)
        out = self.model(
            tokens,
            terms=self.inputs.terms[:, :width] if visual else None,
            attention_mask=decode_mask(see, kv_len),
            position_ids=see[:, None],
            past_key_values=self.cache,
            logits_to_keep=1,
        )
        generators: list[torch.Generator | None] = [None] * width
        for r in rows:
            generators[r.slot] = self._generator_of(r)
        sampled, tokens_list, bad = sample_rows(
            out.logits[:, -1],
            self.inputs.temperature[:width],
            self.inputs.top_p[:width],
            self.inputs.ignore_eos[:width],
            generators,
            self.tokenizer.eos_id,
        )
        self.inputs.advance(width, sampled)
        for r in rows:
            self._take(r, tokens_list[r.slot], bad[r.slot])
        eos = self.tokenizer.eos_id
        self.observer.tokens(sum(not bad[r.slot] and tokens_list[r.slot] != eos for r in rows))

    def _take(self, row: _Row, token: int, bad: bool) -> bool:
        """Record a sampled token and hand it to the delivery; end the row when it is done.
        True while the row goes on. Logits that cannot be sampled end that row alone: the
        batch's other rows are other clients' generations."""
        if bad:
            error = "the model's logits for this generation hold NaN"
            self._free(row, InputError("generation", "not_finite", error))
            return False
        tokens = row.handle.tokens
        if token == self.tokenizer.eos_id:
            self._free(row, "eos")
            return False
        tokens.append(token)
        if row.stop and text_of(self.tokenizer, row, len(tokens))[1]:
            self._free(row, "stop")
            return False
        if len(tokens) >= row.budget:
            self._free(row, "length")
            return False
        self._outbox.append(Delivery(row, len(tokens)))
        return True

    def _free(self, row: _Row, end: str | BaseException) -> None:
        """The row leaves: its slot (and the slot's KV memory) is free for the next step."""
        self._slots[row.slot] = None
        self.inputs.leave(row.slot)
        self._visual_slots.discard(row.slot)
        elapsed = time.perf_counter() - row.submitted
        self._request_s = 0.8 * self._request_s + 0.2 * elapsed
        self._outbox.append(Delivery(row, len(row.handle.tokens), end))
