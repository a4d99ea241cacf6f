"""Short-lived signed thumbnail URLs: ``/v1/images/{id}?expires=T&signature=S``, where S is an
HMAC-SHA256 over the id and T with the server's secret. An ``<img src>`` on any page can show
the thumbnail until T without the API key (which an image request cannot send)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from typing import Any

from fastapi import Request

from cachebind.serve.deps import require_user, serve_state
from cachebind.serve.errors import ApiError

IMAGES_PREFIX = "/v1/images/"


def signature(secret: bytes, row_id: int, expires: int) -> str:
    # "image:" keeps these signatures apart from the cursors signed with the same secret.
    mac = hmac.new(secret, f"image:{row_id}:{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def signed_image_url(base: str, secret: bytes, row_id: int, ttl_s: int) -> str:
    """The absolute URL of a row's thumbnail, valid for ``ttl_s`` seconds from now."""
    expires = int(time.time()) + ttl_s
    query = urllib.parse.urlencode(
        {"expires": expires, "signature": signature(secret, row_id, expires)}
    )
    return f"{base.rstrip('/')}{IMAGES_PREFIX}{row_id}?{query}"


def is_signed(scope: dict[str, Any]) -> bool:
    """A thumbnail request that carries a signature (checked by its route, not by a key)."""
    return scope.get("path", "").startswith(IMAGES_PREFIX) and b"signature=" in scope.get(
        "query_string", b""
    )


async def require_user_or_signature(request: Request) -> None:
    """The images route's guard: a valid, unexpired signature for this id, or a user key."""
    given = request.query_params.get("signature")
    if given is None:
        await require_user(request)
        return
    try:
        expires = int(request.query_params.get("expires", ""))
        row_id = int(request.path_params.get("row_id", ""))
    except ValueError:
        raise ApiError(403, "bad_signature", "a signed URL needs integer expires and id") from None
    secret = serve_state(request).cursor_secret
    if not hmac.compare_digest(given, signature(secret, row_id, expires)):
        raise ApiError(403, "bad_signature", "the URL's signature does not match it")
    if expires < time.time():
        raise ApiError(403, "expired", "the signed URL has expired; search again for a new one")
