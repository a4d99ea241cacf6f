"""Content parts -> the service's query inputs: data URLs and inline audio become media bytes;
a remote URL is fetched only from a host the operator allow-listed, within the input limits."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass

import httpx

from cachebind.config import InputLimits, OpenAIConfig
from cachebind.modalities import Modality
from cachebind.serve.errors import ApiError
from cachebind.serve.llava import CachedRow
from cachebind.serve.openai.errors import invalid
from cachebind.serve.openai.schemas import (
    AudioUrlPart,
    ImagePart,
    InputAudioPart,
    Message,
    Part,
    TextPart,
    VideoUrlPart,
)
from cachebind.serve.schemas import InputItem


@dataclass(frozen=True)
class MediaRef:
    """A medium named by a content part, before its bytes are read."""

    modality: Modality
    url: str | None  # a data: or http(s) URL
    data: str | None  # base64 given inline (input_audio)
    where: str  # the part's place in the request, for errors


def media_of(part: Part, where: str) -> MediaRef | None:
    """The medium of a content part (None for a text part)."""
    if isinstance(part, TextPart):
        return None
    if isinstance(part, ImagePart):
        return MediaRef(Modality.IMAGE, part.image_url.url, None, f"{where}.image_url.url")
    if isinstance(part, InputAudioPart):
        return MediaRef(Modality.AUDIO, None, part.input_audio.data, f"{where}.input_audio.data")
    if isinstance(part, AudioUrlPart):
        return MediaRef(Modality.AUDIO, part.audio_url.url, None, f"{where}.audio_url.url")
    assert isinstance(part, VideoUrlPart)
    return MediaRef(Modality.VIDEO, part.video_url.url, None, f"{where}.video_url.url")


def message_media(messages: list[Message], field: str = "messages") -> list[MediaRef]:
    """Every medium of a conversation, in order of appearance."""
    refs = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                ref = media_of(part, f"{field}[{i}].content[{j}]")
                if ref is not None:
                    refs.append(ref)
    return refs


CACHED_ROWS = "cachebind://rows/"
"""The URL prefix of an image that is a row of the served cache (``cachebind://rows/<id>``)."""


def cached_row(ref: MediaRef) -> CachedRow | None:
    """The cached row an image URL names (None for any other URL)."""
    if ref.url is None or not ref.url.lower().startswith(CACHED_ROWS):
        return None
    if ref.modality is not Modality.IMAGE:
        raise invalid("unsupported_url", f"{ref.where}: a cached row is an image", ref.where)
    text = ref.url[len(CACHED_ROWS) :]
    try:
        row = int(text)
    except ValueError:
        row = None
    if row is None or not -(2**63) <= row < 2**63 or not text.lstrip("-").isdigit():
        raise invalid("bad_row_id", f"{ref.where}: {text[:40]!r} is not a row id", ref.where)
    return CachedRow(row, ref.where)


async def input_of(ref: MediaRef, config: OpenAIConfig, limits: InputLimits) -> InputItem:
    """The query input of one medium (its bytes as base64; decoding happens in the sandbox)."""
    if ref.data is not None:
        return InputItem(modality=ref.modality, data=ref.data)
    assert ref.url is not None
    scheme = ref.url.split(":", 1)[0].lower()
    if scheme == "data":  # decoded where every medium's data is (serve.inputs.media_bytes)
        return InputItem(modality=ref.modality, data=ref.url)
    if scheme == "cachebind":
        raise invalid(
            "unsupported_url",
            f"{ref.where}: cached rows stand for images in llava mode (llm.mode) only",
            ref.where,
        )
    if scheme not in ("http", "https"):
        raise invalid(
            "unsupported_url", f"{ref.where}: only data:, http: and https: URLs are read", ref.where
        )
    host = (urllib.parse.urlsplit(ref.url).hostname or "").lower()
    if host not in {h.lower() for h in config.media_hosts}:
        raise invalid(
            "remote_url_refused",
            f"{ref.where} names a remote URL on host {host!r}; this server fetches URLs only "
            "from the hosts its operator lists in serve.openai.media_hosts. Send the bytes "
            "as a data: URL instead.",
            ref.where,
        )
    raw = await fetch(ref.url, ref.where, config.media_fetch_timeout_s, limits.max_bytes)
    return InputItem(modality=ref.modality, data=base64.b64encode(raw).decode("ascii"))


async def fetch(url: str, where: str, timeout_s: float, max_bytes: int) -> bytes:
    """The body of an allow-listed URL: no redirects (they could leave the allow-list), no
    more than ``max_bytes``, within ``timeout_s``."""
    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise invalid(
                    "fetch_failed", f"{where}: GET answered {response.status_code}", where
                )
            chunks, seen = [], 0
            async for chunk in response.aiter_bytes():
                seen += len(chunk)
                if seen > max_bytes:
                    raise invalid("too_large", f"{where}: more than {max_bytes} bytes", where)
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except (httpx.HTTPError, binascii.Error) as exc:
        raise invalid("fetch_failed", f"{where}: {type(exc).__name__}: {exc}", where) from None
