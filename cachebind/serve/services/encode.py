"""Raw input -> F_M: decoded off the event loop (media in the sandbox), encoded micro-batched,
one batcher per modality, all on the one model thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cachebind.arrays import Floats
from cachebind.config import ServeConfig
from cachebind.errors import InputError
from cachebind.modalities import Modality
from cachebind.serve.batching import MicroBatcher
from cachebind.serve.decoding import MediaDecoder
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import Runtime
from cachebind.serve.services.batchers import service_batcher


class EncodeService:
    """Owns the encoder batchers and the model thread they share."""

    def __init__(self, config: ServeConfig, metrics: Metrics, media: MediaDecoder) -> None:
        self.config = config
        self.metrics = metrics
        self.media = media
        # One thread for the model: torch already uses every core inside one call, and a
        # single worker lets the batcher grow batches while the model is busy.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cachebind-encoder")
        self.batchers: dict[Modality, MicroBatcher[Any, Floats]] = {}

    def batcher(self, runtime: Runtime, modality: Modality) -> MicroBatcher[Any, Floats]:
        """The batcher of ``modality``, created on its first input."""
        batcher = self.batchers.get(modality)
        if batcher is None:
            batcher = self.batchers[modality] = service_batcher(
                lambda tensors: list(runtime.encode_batch(modality, tensors)),
                self.config,
                self.metrics,
                f"encoder:{modality.value}",
                executor=self.executor,
            )
        return batcher

    async def embed_one(
        self, runtime: Runtime, modality: Modality, raw: Any, source: str
    ) -> Floats:
        """F_M of one raw input (a decoding failure is an ``InputError`` naming ``source``)."""
        tensor = await self.media.decode(modality, raw, source)
        f_m = await self.batcher(runtime, modality).submit(tensor)
        if not np.isfinite(f_m).all():
            # Finite but enormous values (a float WAV of 1e30, an IMU file of 3e38) pass the
            # decoder and overflow the encoder: refused here, before a NaN reaches a search, a
            # blend or a generation batch that other requests share.
            raise InputError(
                source,
                "not_finite",
                "the encoder's output for this input is not finite "
                "(its values are far outside the modality's range)",
            )
        return f_m

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
