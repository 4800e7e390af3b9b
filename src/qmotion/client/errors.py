"""Errors of the HTTP clients; every foreign (httpx) exception is translated in one place.

ClientError
 ├── Unreachable       no HTTP answer at all (connection refused, timeout)
 └── ApiError          the service answered with an error body (``detail`` has its fields)
      ├── Unauthorized 401
      ├── NotFound     404
      ├── Conflict     409 (refused before anything changed)
      ├── Invalid      422 (refused before anything changed; ``detail.field`` names the input)
      └── ServerError  5xx (failed partway; the message says what was cleaned up)
"""

from __future__ import annotations

from qmotion.api.errors import ErrorDetail
from qmotion.errors import QmotionError


class ClientError(QmotionError):
    """Root of the client errors."""


class Unreachable(ClientError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: unreachable: {reason}")
        self.url = url


class ApiError(ClientError):
    def __init__(self, status: int, detail: ErrorDetail) -> None:
        where = f" [{detail.field}]" if detail.field else ""
        super().__init__(f"{detail.message}{where}")
        self.status = status
        self.detail = detail


class Unauthorized(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class Invalid(ApiError):
    pass


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    422: Invalid,
}


def error_for(status: int, detail: ErrorDetail) -> ApiError:
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, detail)
