"""Who may call the manager: users, roles, hashed API tokens, the route policy and the audit log.

The policy is a function of the HTTP method and the route's template, so a route added later is
covered without anyone listing it: reads need a viewer, anything that changes state an
operator, and the routes of hosts, users, tokens, cluster settings and the audit log an admin.
The service token the manager was started with (its token file) acts as the built-in admin
``root``: the first user is made with it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qmotion.api.access import AuditEntry, Role, TokenCreated, TokenOut, UserCreate, UserOut
from qmotion.server.db import ApiToken, AuditRecord, Database, User, utcnow
from qmotion.server.errors import Conflict, NotFound

ROOT = "root"
TOKEN_PREFIX = "qmu_"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reads that only an admin may make: who exists, and what everyone did.
ADMIN_PREFIXES = ("/v1/users", "/v1/tokens", "/v1/audit")
# Changes that only an admin may make: the cluster's membership and settings.
ADMIN_CHANGES = frozenset(
    {
        ("POST", "/v1/hosts"),
        ("POST", "/v1/hosts/join-tokens"),
        ("DELETE", "/v1/hosts/{name}"),
        ("PUT", "/v1/pool"),
        ("PUT", "/v1/cluster/settings"),
        ("POST", "/v1/cluster/rotate-certs"),
    }
)
# POSTs that only compute an answer (a body too rich for a query string): a viewer may ask.
READ_ONLY_POSTS = frozenset({("POST", "/v1/drs/place")})
IDENTITY = "qmotion.identity"  # where the check leaves the caller, for the audit
TASK_ID = "qmotion.task_id"  # the task a call started, when its answer is not the task
LAST_USED_EVERY_S = 60.0  # a token's last use is written at most this often (not every call)


def required_role(method: str, route: str) -> Role:
    """The least role that may call ``method route`` (``route``: the template)."""
    if route.startswith(ADMIN_PREFIXES) or (method, route) in ADMIN_CHANGES:
        return Role.ADMIN
    if method in READ_METHODS or (method, route) in READ_ONLY_POSTS:
        return Role.VIEWER
    return Role.OPERATOR


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    user: str
    role: Role
    token_id: int | None = None  # None: the service token


def outcome(status: int) -> str:
    if status in (401, 403):
        return "denied"
    if status >= 500:
        return "failed"
    return "refused" if status >= 400 else "ok"


class Access:
    """Users, tokens and the audit log, in the manager's database."""

    def __init__(self, db: Database, service_token: str) -> None:
        self.db = db
        self._service = digest(service_token)

    # ------------------------------------------------------------------ identities

    def identify(self, token: str) -> Identity | None:
        """The caller a bearer token names, or None (unknown or revoked)."""
        return self.identify_digest(digest(token))

    def identify_digest(self, d: str) -> Identity | None:
        """The same for a token known by its digest only (a console session keeps no token):
        a token revoked or a user removed since ends the session at once."""
        if secrets.compare_digest(d, self._service):
            return Identity(ROOT, Role.ADMIN)
        with self.db.session() as s:
            row = s.execute(
                select(ApiToken, User)
                .join(User, User.id == ApiToken.user_id)
                .where(ApiToken.digest == d, ApiToken.revoked_at.is_(None))
            ).first()
            if row is None:
                return None
            tok, user = row
            now = utcnow()
            if tok.last_used_at is None or (now - tok.last_used_at).total_seconds() > (
                LAST_USED_EVERY_S
            ):
                tok.last_used_at = now
            return Identity(user.name, Role(user.role), tok.id)

    # ------------------------------------------------------------------ users

    def add_user(self, req: UserCreate) -> UserOut:
        if req.name == ROOT:
            raise Conflict(f"{ROOT} is the service token's name; pick another", field="name")
        with self.db.session() as s:
            if s.scalars(select(User).where(User.name == req.name)).first() is not None:
                raise Conflict(f"user {req.name} exists", field="name")
            user = User(name=req.name, role=req.role.value)
            s.add(user)
            s.flush()
            return self._user_out(user, 0)

    def users(self) -> list[UserOut]:
        with self.db.session() as s:
            counts = dict(
                s.execute(
                    select(ApiToken.user_id, func.count())
                    .where(ApiToken.revoked_at.is_(None))
                    .group_by(ApiToken.user_id)
                ).all()
            )
            return [
                self._user_out(u, counts.get(u.id, 0))
                for u in s.scalars(select(User).order_by(User.name))
            ]

    def remove_user(self, name: str) -> None:
        """Removes the user and revokes every token of theirs (their audit rows stay)."""
        with self.db.session() as s:
            user = self._user(s, name)
            for tok in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id)):
                s.delete(tok)
            s.delete(user)

    # ------------------------------------------------------------------ tokens

    def create_token(self, name: str, label: str) -> TokenCreated:
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.session() as s:
            user = self._user(s, name)
            tok = ApiToken(user_id=user.id, digest=digest(secret), prefix=secret[:12], label=label)
            s.add(tok)
            s.flush()
            return TokenCreated(**self._token_out(tok, user.name).model_dump(), token=secret)

    def tokens(self, name: str) -> list[TokenOut]:
        with self.db.session() as s:
            user = self._user(s, name)
            rows = s.scalars(
                select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
            )
            return [self._token_out(t, user.name) for t in rows]

    def revoke_token(self, token_id: int) -> TokenOut:
        """Revoked at once: the next call with it is refused (401). Revoking twice is fine."""
        with self.db.session() as s:
            tok = s.get(ApiToken, token_id)
            if tok is None:
                raise NotFound(f"no token {token_id}")
            if tok.revoked_at is None:
                tok.revoked_at = utcnow()
            user = s.get(User, tok.user_id)
            return self._token_out(tok, user.name if user else "?")

    # ------------------------------------------------------------------ audit

    def record(
        self,
        *,
        who: Identity | None,
        method: str,
        path: str,
        route: str | None,
        status: int,
        client: str | None,
        task_id: int | None,
    ) -> None:
        with self.db.session() as s:
            s.add(
                AuditRecord(
                    user=who.user if who else None,
                    role=who.role.value if who else None,
                    method=method,
                    path=path[:512],
                    route=route,
                    status=status,
                    client=client,
                    task_id=task_id,
                )
            )

    def audit(
        self, *, limit: int, after: int | None = None, user: str | None = None
    ) -> tuple[list[AuditEntry], int | None]:
        """Newest first; ``after``: continue below that id. Returns the page and the cursor
        of the next one (None: that was the last)."""
        with self.db.session() as s:
            q = select(AuditRecord).order_by(AuditRecord.id.desc())
            if after is not None:
                q = q.where(AuditRecord.id < after)
            if user is not None:
                q = q.where(AuditRecord.user == user)
            rows = list(s.scalars(q.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return [self._audit_out(r) for r in rows], (rows[-1].id if more else None)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _user(s: Session, name: str) -> User:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise NotFound(f"no user {name}")
        return user

    @staticmethod
    def _user_out(u: User, tokens: int) -> UserOut:
        return UserOut(name=u.name, role=Role(u.role), created_at=u.created_at, tokens=tokens)

    @staticmethod
    def _token_out(t: ApiToken, user: str) -> TokenOut:
        return TokenOut(
            id=t.id,
            user=user,
            label=t.label,
            prefix=t.prefix,
            created_at=t.created_at,
            last_used_at=t.last_used_at,
            revoked_at=t.revoked_at,
        )

    @staticmethod
    def _audit_out(r: AuditRecord) -> AuditEntry:
        return AuditEntry(
            id=r.id,
            at=r.at,
            user=r.user,
            role=Role(r.role) if r.role else None,
            method=r.method,
            path=r.path,
            route=r.route,
            status=r.status,
            outcome=outcome(r.status),
            client=r.client,
            task_id=r.task_id,
        )
