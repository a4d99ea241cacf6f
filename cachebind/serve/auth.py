"""API keys: stored hashed (``sha256:<hex>`` lines), checked in constant time.

A user key opens every ``/v1`` route except the admin ones; an admin key opens everything.
Keys arrive as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The plaintext key is
never stored: the files hold only its sha256, so a leaked key file does not leak a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

KEY_PREFIX = "cb_"


def hash_key(key: str) -> str:
    """The line stored in a key file for ``key``: ``sha256:<hex digest of the UTF-8 key>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A fresh random key (256 bits of entropy, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(keys_file: Path) -> str:
    """Generate a key, append its hash to ``keys_file`` and return it.

    The file is mode 0600 afterwards, whatever it was before: a key file is made private
    whenever it is written. This is what ``cachebind keys create FILE`` calls; the plaintext is
    shown once.
    """
    key = generate_key()
    keys_file = Path(keys_file)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(keys_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    # Before the write, so the new line never sits in a file others can read.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(hash_key(key) + "\n")
    return key


def read_key_file(path: Path) -> list[bytes]:
    """The sha256 digests listed in ``path`` (blank lines and ``#`` comments skipped).

    Raises ValueError naming the line when a line is not ``sha256:<64 hex>``.
    """
    digests: list[bytes] = []
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        algo, _, hexdigest = line.partition(":")
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if algo != "sha256" or len(digest) != 32:
            raise ValueError(f"{path}:{lineno}: expected 'sha256:<64 hex digits>'")
        digests.append(digest)
    return digests


class Role(IntEnum):
    """What a presented key may do; higher includes lower."""

    NONE = 0
    USER = 1
    ADMIN = 2


@dataclass
class KeyStore:
    """The hashed user and admin keys of one server."""

    user: list[bytes] = field(default_factory=list)
    admin: list[bytes] = field(default_factory=list)

    @classmethod
    def from_files(cls, api_keys_file: Path | None, admin_keys_file: Path | None) -> KeyStore:
        return cls(
            user=read_key_file(api_keys_file) if api_keys_file else [],
            admin=read_key_file(admin_keys_file) if admin_keys_file else [],
        )

    def role(self, key: str | None) -> Role:
        """The role of ``key``; ``Role.NONE`` when it matches nothing.

        Every stored digest is compared (no early exit) with ``hmac.compare_digest``, so the time
        taken does not tell an attacker which key, or how much of one, matched.
        """
        if not key:
            return Role.NONE
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        is_admin = _any_equal(digest, self.admin)
        is_user = _any_equal(digest, self.user)
        if is_admin:
            return Role.ADMIN
        return Role.USER if is_user else Role.NONE


def _any_equal(digest: bytes, candidates: Iterable[bytes]) -> bool:
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(digest, candidate)
    return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents, from ``Authorization: Bearer`` or ``X-API-Key``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key:
        return x_api_key.strip()
    return None


def write_key_file(path: Path, keys: Iterable[str]) -> Path:
    """Write the hashes of ``keys`` to ``path`` (replacing it, mode 0600); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(hash_key(k) + "\n" for k in keys))
    return path
