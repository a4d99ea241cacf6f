"""The models and data a server answers from: encoder, table, index, cache model, generator.

Everything here is synchronous and thread-safe; the HTTP layer calls it from worker threads
through the micro-batchers. The index part is an immutable ``IndexSnapshot`` that is swapped as a
whole when a new version is published, so a request that took the old snapshot finishes on it
(its index, its table version and its cache model agree with each other).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cachebind.config import (
    RELEASED_MAX_NEW_TOKENS,
    RELEASED_TEMPERATURE,
    RELEASED_TOP_P,
    CacheConfig,
    IndexConfig,
    LLMConfig,
    Settings,
    StoreConfig,
)
from cachebind.modalities import Modality
from cachebind.published.layout import current_version
from cachebind.published.manifest import Manifest, as_manifest, read_manifest

log = logging.getLogger("cachebind.serve")


class SearchIndex(Protocol):
    """What serving needs of an index (``cachebind.published.load.LoadedIndex`` has this
    shape)."""

    def search(
        self, queries: np.ndarray, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


class IndexLoader(Protocol):
    """Where index versions come from: a cheap version probe and a (slow) load."""

    def current_version(self) -> str | None: ...

    def load(self) -> IndexSnapshot: ...


if TYPE_CHECKING:  # at run time imported where used: the store pulls in lancedb
    from cachebind.cache import CacheModel
    from cachebind.store import CacheTable


@dataclass(frozen=True)
class IndexSnapshot:
    """One published index with the table version it was built from and its cache model.

    ``table`` is pinned at that version, with its id lookup built at load time (off the request
    path); the cache model takes its exact F_value vectors from it.
    """

    version: str | None
    index: SearchIndex
    table: CacheTable
    cache: CacheModel
    rows: int
    """Row count of the pinned table version."""
    manifest: Manifest
    """The version's manifest (``GET /v1/index`` shows its JSON object)."""

    @classmethod
    def of(
        cls,
        index: SearchIndex,
        table: CacheTable,
        version: str | None,
        manifest: Manifest | Mapping[str, Any],
    ) -> IndexSnapshot:
        """``manifest`` typed (a JSON object is read as :meth:`Manifest.from_json` reads one)."""
        from cachebind.cache import CacheModel

        table.build_id_lookup()
        cache = CacheModel(index, table)
        return cls(version, index, table, cache, table.count(), as_manifest(manifest))


class PublishedIndexLoader:
    """Index versions published under ``index.dir`` (the CURRENT pointer), read through
    :mod:`cachebind.published`.

    A load opens the table at the version named in the index's manifest: the embedding job may
    have appended rows since the index was built, and the rows an index's ids point at are those
    of the version it was built from. ``load_version`` still checks row count and ids
    (IndexMismatchError), which the reload loop reports while it keeps the old snapshot.
    """

    def __init__(self, index: IndexConfig, store: StoreConfig) -> None:
        self.index_dir = Path(index.dir)
        self.use_gpu = index.use_gpu
        self.store = store

    def current_version(self) -> str | None:
        return current_version(self.index_dir)

    def load(self) -> IndexSnapshot:
        from cachebind.published.load import load_version
        from cachebind.store import CacheTable

        version = current_version(self.index_dir)
        if version is None:
            raise FileNotFoundError(f"no index published in {self.index_dir}")
        manifest = read_manifest(self.index_dir, version)
        table = CacheTable.open(self.store, version=manifest.table.version)
        loaded = load_version(self.index_dir, version, table, use_gpu=self.use_gpu)
        return IndexSnapshot.of(loaded, table, loaded.version, loaded.manifest)


class Runtime:
    """Holds the encoder (F_M), the current index snapshot and the optional generator.

    Each backing part is a constructor argument, so that a test or a notebook can serve what it
    has built in memory; ``Runtime.from_settings`` loads them all from configuration.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        snapshot: IndexSnapshot | None = None,
        loader: IndexLoader | None = None,
        generator: Any | None = None,
        cache_config: CacheConfig | None = None,
        generation_defaults: dict[str, Any] | None = None,
        llm_config: LLMConfig | None = None,
        allow_encoder_mismatch: bool = False,
        extra_search: dict[str, Any] | None = None,
    ) -> None:
        visual_dim = getattr(generator, "visual_dim", None)
        if generator is not None and visual_dim is not None and visual_dim != encoder.out_dim:
            # F~_M goes into the bind network as is: the two must agree, or every generation
            # would fail. Say so at start-up rather than blame each request.
            raise ValueError(
                f"the LLM's bind network takes {visual_dim}-d features but the encoder gives "
                f"{encoder.out_dim}-d (encoder preset {encoder.identity.get('preset')!r})"
            )
        self.encoder = encoder
        self.allow_encoder_mismatch = allow_encoder_mismatch
        # Extra encoders' indexes by name (``serve.extra_search.ExtraSearch``).
        self.extra_search = dict(extra_search or {})
        if snapshot is not None:
            self.check_encoder(snapshot)
        self.loader = loader
        self.generator = generator
        self.cache_config = cache_config or CacheConfig()
        self.generation_defaults = generation_defaults or {
            "max_new_tokens": RELEASED_MAX_NEW_TOKENS,
            "temperature": RELEASED_TEMPERATURE,
            "top_p": RELEASED_TOP_P,
        }
        self._snapshot = snapshot
        self._swap_lock = threading.Lock()
        # Every generation goes through the scheduler's thread, which owns the model and
        # decodes all running requests together (in-flight batching).
        self.scheduler = None
        if generator is not None:
            from cachebind.inject.scheduler import Scheduler

            llm = llm_config or LLMConfig()
            self.scheduler = Scheduler(
                generator,
                max_batch=llm.max_batch,
                max_queue=llm.max_queue,
                prefill_chunk=llm.prefill_chunk,
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Settings, *, with_generator: bool = True) -> Runtime:
        """Load the encoder, the published index (if any) and the LLM (if configured)."""
        from cachebind.encode import Encoder

        encoder = Encoder.from_config(settings.encoder, settings.weights)
        loader = PublishedIndexLoader(settings.index, settings.store)
        snapshot = None
        if loader.current_version() is not None:
            snapshot = loader.load()
        else:
            log.warning("no index published under %s yet; polling for one", settings.index.dir)
        generator = None
        llm = settings.llm
        if with_generator and (llm.llama_dir is not None or llm.mode == "llava"):
            from cachebind.inject.served import load_served_llm

            generator = load_served_llm(settings, encoder)
        extra_search = None
        if settings.serve.extra_indexes:
            from cachebind.serve.extra_search import load_extra_searches

            extra_search = load_extra_searches(settings)
        return cls(
            encoder,
            snapshot=snapshot,
            loader=loader,
            generator=generator,
            extra_search=extra_search,
            cache_config=settings.cache,
            generation_defaults={
                "max_new_tokens": settings.llm.max_new_tokens,
                "temperature": settings.llm.temperature,
                "top_p": settings.llm.top_p,
            },
            llm_config=settings.llm,
            allow_encoder_mismatch=settings.encoder.allow_mismatch,
        )

    # ------------------------------------------------------------------ encoder

    @property
    def dim(self) -> int:
        return int(self.encoder.out_dim)

    @property
    def encoder_identity(self) -> dict[str, Any]:
        return dict(self.encoder.identity)

    def encode_batch(self, modality: Modality, tensors: Sequence[Any]) -> np.ndarray:
        """F_M for a batch of preprocessed inputs of one modality: float32 [B, d], unit norm.

        This is ``Encoder.embed`` split in two, so that preprocessing (and its InputError) stays
        with each request while the model call is shared by the whole micro-batch.
        """
        import torch

        batch = torch.stack(list(tensors))
        with torch.inference_mode():
            out = self.encoder.encode(modality, batch)
        f_m = out.detach().to("cpu", torch.float32).numpy()
        norm = np.linalg.norm(f_m, axis=1, keepdims=True)
        return (f_m / np.maximum(norm, 1e-12)).astype(np.float32)

    # ------------------------------------------------------------------ index

    @property
    def snapshot(self) -> IndexSnapshot | None:
        """The index snapshot new requests use (a plain attribute read: atomic)."""
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self.encoder is not None and self._snapshot is not None

    def check_encoder(self, snapshot: IndexSnapshot) -> None:
        """Raise ``EncoderMismatchError`` unless the snapshot's table records this encoder
        (or records none, or ``allow_encoder_mismatch``, which logs it)."""
        from cachebind.store.identity import check_encoder

        table = snapshot.table
        metadata = getattr(table, "metadata", None)
        name = getattr(getattr(table, "table", None), "name", None)
        check_encoder(
            self.encoder_identity,
            metadata if isinstance(metadata, dict) else None,
            f"{name!r} (index version {snapshot.version})",
            allow=self.allow_encoder_mismatch,
        )

    def swap(self, snapshot: IndexSnapshot) -> IndexSnapshot | None:
        """Make ``snapshot`` the one new requests get; returns the previous one. A snapshot
        whose table was embedded by another encoder is refused (``EncoderMismatchError``)."""
        self.check_encoder(snapshot)
        with self._swap_lock:
            old, self._snapshot = self._snapshot, snapshot
        log.info("serving index version %s", snapshot.version)
        return old

    def poll_index(self, force: bool = False) -> bool:
        """Load and swap in the published version if it differs (or ``force``).

        Returns True when a new snapshot was swapped in. Errors (a half-written version, an
        IndexMismatchError) propagate to the caller, which keeps serving the old snapshot.
        """
        if self.loader is None:
            return False
        published = self.loader.current_version()
        current = self._snapshot.version if self._snapshot else None
        if published is None or (published == current and not force):
            return False
        snapshot = self.loader.load()
        self.swap(snapshot)
        return True

    def poll_extra_indexes(self, force: bool = False) -> bool:
        """``poll`` each extra encoder's index (``serve.extra_indexes``); True when one was
        swapped. Every one is polled; the first error is raised after, the others' old
        versions kept."""
        swapped, errors = False, []
        for searcher in self.extra_search.values():
            try:
                swapped |= bool(searcher.poll(force))
            except Exception as exc:  # another index's reload does not wait on this one
                errors.append(exc)
        if errors:
            raise errors[0]
        return swapped

    # ------------------------------------------------------------------ generation

    @property
    def llm_mode(self) -> str | None:
        """``adapter`` (F~_M into the adapter), ``llava`` (visual tokens in the prompt) or None
        (no LLM)."""
        return None if self.generator is None else str(getattr(self.generator, "mode", "adapter"))

    def submit_generation(
        self,
        prompt: str,
        visual: np.ndarray | None,
        *,
        sink: Any = None,
        timeout_s: float | None = None,
        images: Any = None,
        **options: Any,
    ) -> Any:
        """Queue a generation on the scheduler (``inject.scheduler.GenerationHandle``).

        ``visual`` is F~_M ([1, d] or [d]; None: plain LLaMA); ``images`` the prompt's images
        in llava mode (``inject.llava_serve.PromptImages``). Raises ``SchedulerBusy`` when
        ``llm.max_queue`` generations already wait, ``InputError`` on bad options.
        """
        if self.scheduler is None:
            raise RuntimeError("no LLM configured (set llm.llama_dir)")
        opts = {**self.generation_defaults, **{k: v for k, v in options.items() if v is not None}}
        if images is not None:
            opts["images"] = images
        return self.scheduler.submit(prompt, visual, sink=sink, timeout_s=timeout_s, **opts)

    def generate_stream(
        self, prompt: str, visual: np.ndarray | None, **options: Any
    ) -> Iterator[str]:
        """Text pieces from the LLM conditioned on ``visual`` (F~_M, [1, d]; None: plain LLaMA).

        Blocks the calling thread; closing the iterator early cancels the generation."""
        yield from self.submit_generation(prompt, visual, **options)
