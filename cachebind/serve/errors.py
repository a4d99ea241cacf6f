"""HTTP errors the handlers raise on purpose: a status, a short tag and what to fix."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Turned into ``{"error": tag, "detail": detail}`` with ``status`` by the app (and
    ``"param"``, the request field at fault, when given)."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.headers = headers
        self.status = status
        self.error = error
        self.detail = detail
        self.param = param


def unprocessable(error: str, detail: Any) -> ApiError:
    return ApiError(422, error, detail)


def unavailable(detail: str) -> ApiError:
    return ApiError(503, "not_ready", detail)
