"""Typed FastAPI dependencies shared by the route modules.

Handlers reach their app's state through ``request.app.state.serve`` (one ``ServeState`` per
app, so two apps in one process never share keys, batchers or metrics), never a module global.
Every dependency here is ``async``: FastAPI runs a plain function in its thread pool, one more
hop per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from cachebind.config import ServeConfig
from cachebind.serve.auth import Role, presented_key
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.state import ServeState

T = TypeVar("T")


def serve_state(request: Request) -> ServeState:
    """The ``ServeState`` of the app that received ``request``."""
    return request.app.state.serve


async def get_state(request: Request) -> ServeState:
    return serve_state(request)


State = Annotated[ServeState, Depends(get_state)]


# ---------------------------------------------------------------- keys


def role_of(state: ServeState, request: Request) -> Role:
    """The role of the key the request presents (401 without a valid one; ADMIN when auth is
    off)."""
    if not state.config.auth:
        return Role.ADMIN
    assert state.keys is not None
    key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    role = state.keys.role(key)
    if role is Role.NONE:
        raise ApiError(
            401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return role


async def require_user(request: Request) -> Role:
    """A user or admin key (the dependency of every keyed route)."""
    return role_of(serve_state(request), request)


async def require_admin(request: Request) -> Role:
    """An admin key (403 for a user key)."""
    role = role_of(serve_state(request), request)
    if role < Role.ADMIN:
        raise ApiError(403, "forbidden", "this route needs an admin key")
    return role


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """The request limits of ``serve`` settings: the time budget and the largest k."""

    config: ServeConfig

    async def timed(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or a 504 ``timeout`` after ``request_timeout_s``."""
        try:
            return await asyncio.wait_for(awaitable, self.config.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                504, "timeout", f"the request took longer than {self.config.request_timeout_s} s"
            ) from None

    def check_k(self, k: int, name: str = "k") -> None:
        """A 422 ``k_out_of_range`` when ``k`` is above ``max_k``."""
        if k > self.config.max_k:
            raise unprocessable(
                "k_out_of_range", f"{name}={k} is above the limit {self.config.max_k}"
            )


async def get_limits(request: Request) -> Limits:
    return Limits(serve_state(request).config)


RequestLimits = Annotated[Limits, Depends(get_limits)]
