"""What every qmotion HTTP service shares: bearer-token auth and one error body for all errors."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from qmotion.api.errors import ErrorBody, ErrorDetail


def error_response(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(status_code=status, content=ErrorBody(error=detail).model_dump())


def field_of(loc: tuple[int | str, ...]) -> str:
    """A request location as the field a user wrote: ``disks[0].path``."""
    out = ""
    for p in (str(p) for p in loc if p not in ("body", "query", "path")):
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def bearer_auth(token: str) -> Callable[..., None]:
    """A dependency refusing requests without the service's token (401)."""
    bearer = HTTPBearer(auto_error=False)

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials, token):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize


def install_error_handlers(
    app: FastAPI, domain_error: type[Exception], host: str | None = None
) -> None:
    """The service's own errors (``domain_error``: with status, code, message, vm, field and
    qmp_class), validation and HTTP errors, all in the common error body."""

    @app.exception_handler(domain_error)
    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        e: Any = exc
        return error_response(
            e.status,
            ErrorDetail(
                code=e.code,
                message=e.message,
                vm=e.vm,
                host=getattr(e, "host", None) or host,
                field=e.field,
                qmp_class=e.qmp_class,
            ),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        msg = "; ".join(
            f"{field_of(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errs
        )
        first = field_of(tuple(errs[0].get("loc", ()))) if errs else ""
        return error_response(
            422, ErrorDetail(code="invalid_request", message=msg, field=first or None, host=host)
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found"}.get(exc.status_code, "http_error")
        resp = error_response(
            exc.status_code, ErrorDetail(code=code, message=str(exc.detail), host=host)
        )
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
