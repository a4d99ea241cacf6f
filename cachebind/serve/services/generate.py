"""A generation queued on the runtime's scheduler.

The scheduler is generation's batcher (continuous batching, token by token) and lives with the
model weights in the ``Runtime``; this service turns a frozen request into a queued generation
with the service's errors (503 without an LLM, 429 with ``Retry-After`` on a full queue) and
points the scheduler's observer at the app's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachebind.arrays import Floats
from cachebind.config import ServeConfig
from cachebind.errors import GenerationBusy
from cachebind.serve.errors import ApiError
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import Runtime
from cachebind.serve.streaming import ScheduledStream, scheduled_stream


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Options left None take the server's defaults (``llm.*``)."""

    prompt: str
    visual: Floats | None = None
    """F~_M as [1, d] for the adapter's visual query; None: plain LLaMA."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    template: bool | None = None
    """Wrap the prompt in the mode's template (Alpaca, or LLaVA-1.5's; None: on)."""
    images: Any = None
    """llava mode: the prompt's images (``inject.llava_serve.PromptImages``); None: text."""

    def options(self) -> dict[str, Any]:
        """The scheduler's keyword options (the prompt and visual feature left out)."""
        # Not dataclasses.asdict: it would deep-copy the visual feature and images for nothing.
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "template": self.template,
        }


def require_generator(runtime: Runtime) -> Runtime:
    """``runtime``, with a 503 ``no_llm`` when this server has no LLM."""
    if runtime.generator is None:
        raise ApiError(
            503, "no_llm", "this server has no LLM configured (llm.llama_dir or llm.llava_dir)"
        )
    return runtime


class GenerateService:
    """Queues generations on the runtime's scheduler under the service's request timeout."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.timeout_s = config.request_timeout_s
        self.metrics = metrics

    def observe(self, runtime: Runtime | None) -> None:
        """The scheduler reports queue, occupancy, TTFT and tokens to /metrics."""
        scheduler = getattr(runtime, "scheduler", None)
        if scheduler is not None:
            scheduler.observer = self.metrics

    def start(self, runtime: Runtime, request: GenerationRequest) -> ScheduledStream:
        """Queue ``request`` now: a full queue is a 429 ``busy`` with ``Retry-After`` before
        any response starts."""
        require_generator(runtime)
        try:
            return scheduled_stream(
                runtime,
                request.prompt,
                request.visual,
                request.options(),
                self.timeout_s,
                images=request.images,
            )
        except GenerationBusy as exc:
            raise ApiError(
                429, "busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from None
