"""Pagination cursors: the next page's offset, signed and bound to the query it pages.

A cursor is ``base64url(offset:8 | query digest:16 | tag:16)`` where the tag is
HMAC-SHA256 (truncated to 128 bits) under a per-server secret, and the query digest is
SHA-256 over the request's inputs, filter, dedup and k. So a client can neither forge an
offset nor carry a cursor over to another query (another filter, say): either is 422
``bad_cursor``. The cursor is a fixed-size binary record, never parsed as JSON, so no cursor
text can make the parser recurse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
from typing import Any

from cachebind.serve.errors import unprocessable

_DOMAIN = b"cachebind-cursor-v1"
_DIGEST_BYTES = 16
_TAG_BYTES = 16
_RECORD_BYTES = 8 + _DIGEST_BYTES + _TAG_BYTES
MAX_CURSOR_CHARS = 128


def query_digest(query: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of what a page depends on (inputs, filter, dedup, k)."""
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).digest()[:_DIGEST_BYTES]


def _tag(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + payload, hashlib.sha256).digest()[:_TAG_BYTES]


def encode_cursor(secret: bytes, offset: int, digest: bytes) -> str:
    """The opaque ``next_cursor`` for the page of the query ``digest`` that starts at ``offset``."""
    payload = struct.pack(">Q", offset) + digest
    raw = payload + _tag(secret, payload)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(secret: bytes, cursor: str, digest: bytes) -> int:
    """The offset of a cursor this server issued for the query ``digest``; else 422 bad_cursor."""
    bad = unprocessable("bad_cursor", "cursor is not one this service returned for this query")
    if len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    if len(raw) != _RECORD_BYTES:
        raise bad
    payload, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    # The tag first, in constant time: a forged cursor learns nothing about the query digest.
    if not hmac.compare_digest(tag, _tag(secret, payload)):
        raise bad
    if not hmac.compare_digest(payload[8:], digest):
        raise unprocessable("bad_cursor", "cursor belongs to another query (inputs, filter, k)")
    return struct.unpack(">Q", payload[:8])[0]
