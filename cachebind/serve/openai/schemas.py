"""Request models of the OpenAI-compatible routes.

Fields OpenAI defines that this server does not implement are not silently ignored: a request
that sets one to anything but its neutral value is a 400 naming it (``unsupported``). The
server's own options travel in one extension object, ``cachebind`` (``extra_body`` in the
``openai`` SDK).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from cachebind.serve.schemas import Text

# OpenAI's fields that this server accepts only at the value that asks for nothing: anything
# else would change the answer in a way the server does not do.
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": [False, None],
    "top_logprobs": [0, None],
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": [{}, None],
    "tools": [[], None],
    "functions": [[], None],
    "tool_choice": ["none", None],
    "function_call": ["none", None],
    "parallel_tool_calls": [None, False],
    "response_format": [{"type": "text"}, None],
    "modalities": [["text"], None],
    "store": [False, None],
    "suffix": [None, ""],
}
# Fields accepted with any value because they change nothing in the answer.
HARMLESS = frozenset({"user", "metadata", "service_tier"})


def unsupported(extra: dict[str, Any] | None) -> list[str]:
    """The names (with values) of the fields of ``extra`` this server cannot honour."""
    refused = []
    for name, value in (extra or {}).items():
        if name in HARMLESS:
            continue
        neutral = NEUTRAL.get(name, _ABSENT)
        allowed = neutral if isinstance(neutral, list) else [neutral]
        if neutral is _ABSENT or value not in allowed:
            refused.append(f"{name}={value!r}"[:80])
    return refused


_ABSENT = object()


class Lenient(BaseModel):
    """Unknown fields are kept (``model_extra``) so that the route can refuse them by name."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CacheOptions(Closed):
    """The ``cachebind`` extension object: the cache blend F~_M of the request's media."""

    k: int | None = Field(None, ge=1, description="Neighbours S_topk (default: the server's).")
    t: float | None = Field(None, gt=0, description="Softmax temperature (default: server's).")
    alpha: float | None = Field(None, ge=0, le=1, description="Blend weight (default: server's).")
    blend: StrictBool = Field(
        True,
        description="false: the adapter (or the embedding) gets normalize(F_M), no cache search.",
    )
    enhanced: StrictBool = Field(
        False,
        description="/v1/embeddings only: return F~_M (the cache-enhanced embedding), not F_M.",
    )
    template: StrictBool = Field(
        False,
        description="/v1/completions only: wrap the prompt in the served model's template "
        "(the release's Alpaca one; LLaVA-1.5's in llava mode), as /v1/generate does.",
    )


class UrlRef(Closed):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None


class AudioData(Closed):
    data: str
    format: Literal["wav", "mp3"]


class TextPart(Closed):
    type: Literal["text"]
    text: Text


class ImagePart(Closed):
    type: Literal["image_url"]
    image_url: UrlRef


class InputAudioPart(Closed):
    type: Literal["input_audio"]
    input_audio: AudioData


class AudioUrlPart(Closed):
    type: Literal["audio_url"]
    audio_url: UrlRef


class VideoUrlPart(Closed):
    type: Literal["video_url"]
    video_url: UrlRef


Part = Annotated[
    TextPart | ImagePart | InputAudioPart | AudioUrlPart | VideoUrlPart,
    Field(discriminator="type"),
]


class Message(Closed):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[Part] | None = None
    name: str | None = None


class StreamOptions(Closed):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class Sampling(Lenient):
    """What chat and completion requests share."""

    model: Text
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    cachebind: CacheOptions = Field(default_factory=CacheOptions)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)


class CompletionRequest(Sampling):
    prompt: Text | list[Text]


class EmbeddingRequest(Lenient):
    model: Text
    input: Text | list[Text] | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    cachebind: CacheOptions = Field(default_factory=CacheOptions)
