"""What every qmotion HTTP service shares: bearer-token auth and one error body for all errors."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.constants import REF_PREFIX
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmotion.api.errors import ErrorBody, ErrorDetail

ERROR_DESCRIPTIONS = {
    400: "Malformed request body (not JSON, or not UTF-8)",
    401: "Missing, wrong or revoked bearer token",
    403: "The caller's role may not do this (nothing changed)",
    404: "No such resource",
    409: "Refused: the current state forbids it (nothing changed)",
    422: "Invalid request (nothing changed); `error.field` names the input",
    500: "Failed partway; the message says what was cleaned up",
    502: "A host agent failed or could not be reached",
}
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}
# What every route of a service can answer: a malformed body, no token, a role short of the
# route's, an unknown name, a state that forbids it, an invalid request.
COMMON_ERROR_STATUSES = (400, 401, 403, 404, 409, 422)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the common error body."""
    return {s: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def json_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The same for a route whose success is not JSON (plain text): FastAPI would declare its
    errors in the route's media type, but they are the JSON error body too. The schema is the
    one the service's other routes declare."""
    schema = {"$ref": f"{REF_PREFIX}{ErrorBody.__name__}"}
    return {
        s: {
            "description": ERROR_DESCRIPTIONS[s],
            "content": {"application/json": {"schema": schema}},
        }
        for s in statuses
    }


COMMON_ERRORS = error_responses(*COMMON_ERROR_STATUSES)


def error_response(status: int, detail: ErrorDetail) -> JSONResponse:
    return JSONResponse(status_code=status, content=ErrorBody(error=detail).model_dump())


def field_of(loc: tuple[int | str, ...]) -> str:
    """A request location as the field a user wrote: ``disks[0].path``."""
    out = ""
    for p in (str(p) for p in loc if p not in ("body", "query", "path")):
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def bearer_auth(token: str) -> Callable[..., None]:
    """A dependency refusing requests without the service's token (401). ``token`` may be
    kept as ``sha256:HEX`` (a service only compares it: the file then holds no secret)."""
    bearer = HTTPBearer(auto_error=False)
    digest = token.removeprefix("sha256:").lower() if token.startswith("sha256:") else None

    def matches(given: str) -> bool:
        if digest is not None:
            return secrets.compare_digest(hashlib.sha256(given.encode()).hexdigest(), digest)
        return secrets.compare_digest(given, token)

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not matches(creds.credentials):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize


def domain_detail(exc: Any, host: str | None = None) -> ErrorDetail:
    """A service error (status, code, message, vm, field, qmp_class) as the error body."""
    return ErrorDetail(
        code=exc.code,
        message=exc.message,
        vm=exc.vm,
        host=getattr(exc, "host", None) or host,
        field=exc.field,
        qmp_class=exc.qmp_class,
    )


def validation_detail(
    errs: Sequence[Any], host: str | None = None, whole: str = "body"
) -> ErrorDetail:
    """Pydantic's errors as one body: every field and why; ``field`` the first one's."""
    msg = "; ".join(f"{field_of(tuple(e.get('loc', ()))) or whole}: {e.get('msg')}" for e in errs)
    first = field_of(tuple(errs[0].get("loc", ()))) if errs else ""
    return ErrorDetail(code="invalid_request", message=msg, field=first or None, host=host)


def install_error_handlers(
    app: FastAPI, domain_error: type[Exception], host: str | None = None
) -> None:
    """The service's own errors (``domain_error``: with status, code, message, vm, field and
    qmp_class), validation and HTTP errors, all in the common error body."""

    @app.exception_handler(domain_error)
    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        e: Any = exc
        return error_response(e.status, domain_detail(e, host))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_detail(exc.errors(), host))

    # Starlette's own (no such route: 404, wrong method: 405) as well as FastAPI's.
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        resp = error_response(
            exc.status_code, ErrorDetail(code=code, message=str(exc.detail), host=host)
        )
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
