"""The manager's access control over HTTP: the role check on every route, the audit of every
state-changing call, and the routes of users, tokens and the audit log."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qmotion.api.access import (
    AuditEntry,
    TokenCreate,
    TokenCreated,
    TokenOut,
    UserCreate,
    UserOut,
    WhoAmI,
)
from qmotion.api.vm import NAME_PATTERN
from qmotion.server.access import (
    IDENTITY,
    READ_METHODS,
    TASK_ID,
    Access,
    Identity,
    required_role,
)
from qmotion.server.errors import Forbidden

log = logging.getLogger(__name__)
NEXT_HEADER = "X-Next-After"
UserName = Annotated[str, Path(pattern=NAME_PATTERN)]
TokenId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def role_check(access: Access) -> Callable[..., None]:
    """A dependency: a known, unrevoked token (401 otherwise) whose role the route's policy
    allows (403 otherwise, naming the role needed)."""
    bearer = HTTPBearer(auto_error=False)

    def authorize(
        request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> None:
        who = access.identify(creds.credentials) if creds is not None else None
        if who is None:
            raise HTTPException(
                status_code=401,
                detail="missing, unknown or revoked bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.scope[IDENTITY] = who
        route = request.scope.get("route")
        needed = required_role(request.method, getattr(route, "path", request.url.path))
        if not who.role.allows(needed):
            raise Forbidden(
                f"{who.user} is {who.role.value}; {request.method} "
                f"{getattr(route, 'path', request.url.path)} needs {needed.value}"
            )

    return authorize


class AuditMiddleware:
    """Writes one audit row per state-changing call once its answer is sent: who (None when
    the token was refused), the route, the status and the task it started."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before any answer: the server's error handler's status
        body = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 202:
                body.extend(message.get("body", b"")[:65536])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await self._record(scope, status, bytes(body))

    async def _record(self, scope: Scope, status: int, body: bytes) -> None:
        who: Identity | None = scope.get(IDENTITY)
        route = getattr(scope.get("route"), "path", None)
        client = scope.get("client")
        # A console action answers with a redirect, not the task's JSON: it leaves the id.
        task_id = scope.get(TASK_ID)
        if task_id is None and status == 202 and body:
            try:
                parsed: Any = json.loads(body)
                task_id = parsed.get("id") if isinstance(parsed, dict) else None
            except ValueError:
                task_id = None
        try:
            await anyio.to_thread.run_sync(
                lambda: self.access.record(
                    who=who,
                    method=scope["method"],
                    path=scope["path"],
                    route=route,
                    status=status,
                    client=client[0] if client else None,
                    task_id=task_id if isinstance(task_id, int) else None,
                )
            )
        except Exception:  # the call itself is done; a lost audit row is logged, loudly
            log.exception("audit row for %s %s not written", scope["method"], scope["path"])


def install_access_routes(app: FastAPI, access: Access, auth: list[Any]) -> None:
    """Users, tokens, the audit log and ``whoami``, behind the manager's ``auth``."""

    @app.get("/v1/whoami", response_model=WhoAmI, dependencies=auth)
    def whoami(request: Request) -> WhoAmI:
        who: Identity = request.scope[IDENTITY]
        return WhoAmI(user=who.user, role=who.role)

    @app.post("/v1/users", response_model=UserOut, status_code=201, dependencies=auth)
    def add_user(req: UserCreate) -> UserOut:
        return access.add_user(req)

    @app.get("/v1/users", response_model=list[UserOut], dependencies=auth)
    def list_users() -> list[UserOut]:
        return access.users()

    @app.delete("/v1/users/{name}", status_code=204, dependencies=auth)
    def remove_user(name: UserName) -> None:
        access.remove_user(name)

    @app.post(
        "/v1/users/{name}/tokens", response_model=TokenCreated, status_code=201, dependencies=auth
    )
    def create_token(name: UserName, req: TokenCreate) -> TokenCreated:
        return access.create_token(name, req.label)

    @app.get("/v1/users/{name}/tokens", response_model=list[TokenOut], dependencies=auth)
    def list_tokens(name: UserName) -> list[TokenOut]:
        return access.tokens(name)

    @app.delete("/v1/tokens/{token_id}", response_model=TokenOut, dependencies=auth)
    def revoke_token(token_id: TokenId) -> TokenOut:
        return access.revoke_token(token_id)

    @app.get("/v1/audit", response_model=list[AuditEntry], dependencies=auth)
    def audit(
        response: Response,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
        user: Annotated[str | None, Query(max_length=64)] = None,
    ) -> list[AuditEntry]:
        """Newest first; when there are more, ``X-Next-After`` holds the ``after`` that
        continues."""
        entries, cursor = access.audit(limit=limit, after=after, user=user)
        if cursor is not None:
            response.headers[NEXT_HEADER] = str(cursor)
        return entries
