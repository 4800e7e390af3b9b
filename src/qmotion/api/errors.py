"""The error body every qmotion HTTP API returns, so clients can act on fields, not text."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    vm: str | None = None
    host: str | None = None
    field: str | None = None
    qmp_class: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
