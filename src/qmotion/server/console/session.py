"""Console sign-in: a cookie session over an API token, CSRF checks, the caller of a page.

The cookie holds only a random secret; the manager keeps its digest, the digest of the API
token it stands for and the session's CSRF token in the database (``console_sessions``), so
a session outlives a manager restart and holds on every replica behind one address (a load
balancer in front of them). Each request names the caller through
``Access.identify_digest``, so a token revoked or a user removed ends the session at once and
a role changed applies at once. ``/v1`` never reads the cookie.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request
from sqlalchemy import delete, func, select

from qmotion.server.access import IDENTITY, Access, Identity, digest
from qmotion.server.db import ConsoleSessionRow, Database

MAX_AGE_S = 12 * 3600.0  # a session ends after this however busy it is
IDLE_S = 3600.0  # ... or after this long unused
MAX_SESSIONS = 10_000  # the least recently used go first beyond this: the table stays bounded
TOUCH_EVERY_S = 60.0
FORM_LIMIT = 64 * 1024  # a console form is a few fields; more is refused unread


@dataclass
class ConsoleSession:
    key: str
    token_digest: str
    csrf: str
    created: float
    last_seen: float = field(default=0.0)


class SignedOut(Exception):
    """No valid session: a page redirects to the sign-in, a fragment or a stream gets 401."""


class CsrfRefused(Exception):
    """A state-changing request that did not come from the console's own page (403)."""


class FormTooLarge(Exception):
    """A form body over ``FORM_LIMIT`` (413)."""


def cookie_name(secure: bool) -> str:
    # The __Host- prefix makes the browser refuse a cookie set for a parent domain or
    # over plain HTTP; an insecure lab has only plain HTTP.
    return "__Host-qmotion" if secure else "qmotion"


class Sessions:
    """The signed-in console users, kept in the manager's database. ``clock``: wall-clock
    seconds (replicas compare each other's times)."""

    def __init__(
        self, access: Access, db: Database, clock: Callable[[], float] = time.time
    ) -> None:
        self.access, self.db, self.clock = access, db, clock

    def sign_in(self, token: str) -> tuple[str, Identity] | None:
        """A new session for a valid API token: (the cookie's secret, who), else None."""
        who = self.access.identify(token)
        if who is None:
            return None
        secret = secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.session() as s:
            # Ended sessions go, and beyond the bound the least recently used: bounded.
            s.execute(
                delete(ConsoleSessionRow).where(
                    (ConsoleSessionRow.created < now - MAX_AGE_S)
                    | (ConsoleSessionRow.last_seen < now - IDLE_S)
                )
            )
            count = s.scalar(select(func.count()).select_from(ConsoleSessionRow)) or 0
            if count >= MAX_SESSIONS:
                oldest = select(ConsoleSessionRow.key).order_by(ConsoleSessionRow.last_seen)
                s.execute(
                    delete(ConsoleSessionRow).where(
                        ConsoleSessionRow.key.in_(oldest.limit(count - MAX_SESSIONS + 1))
                    )
                )
            s.add(
                ConsoleSessionRow(
                    key=_key(secret),
                    token_digest=digest(token),
                    csrf=secrets.token_urlsafe(24),
                    created=now,
                    last_seen=now,
                )
            )
        return secret, who

    def sign_out(self, secret: str | None) -> None:
        if secret:
            self._drop(_key(secret))

    def _drop(self, key: str) -> None:
        with self.db.session() as s:
            s.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.key == key))

    def find(self, secret: str | None, touch: bool = True) -> ConsoleSession | None:
        """The live session a cookie names (its idle clock restarted unless ``touch`` is
        False: an open task page is not a person using the console), else None."""
        if not secret:
            return None
        now, key = self.clock(), _key(secret)
        with self.db.session() as s:
            row = s.get(ConsoleSessionRow, key)
            if row is None:
                return None
            if now - row.created > MAX_AGE_S or now - row.last_seen > IDLE_S:
                s.delete(row)
                return None
            # Written at most once a minute: every page view would otherwise be a write.
            if touch and now - row.last_seen > TOUCH_EVERY_S:
                row.last_seen = now
            return ConsoleSession(key, row.token_digest, row.csrf, row.created, row.last_seen)

    def caller(self, request: Request, touch: bool = True) -> tuple[Identity, ConsoleSession]:
        """Who sent this request, as the API would name them; the identity is left where
        the audit middleware looks for it. Raises SignedOut."""
        secure = request.url.scheme == "https"
        sess = self.find(request.cookies.get(cookie_name(secure)), touch)
        if sess is None:
            raise SignedOut()
        who = self.access.identify_digest(sess.token_digest)
        if who is None:  # the token was revoked or its user removed
            self._drop(sess.key)
            raise SignedOut()
        request.scope[IDENTITY] = who
        return who, sess


def _key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_origin(request: Request) -> bool:
    """Whether the browser says this request came from one of our own pages. Fetch metadata
    first (every current browser sends it); else the Origin, else the Referer, must be this
    server's own origin. A request with none of them is refused: a form of ours always has
    one."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == own
    return False


class Form:
    """An url-encoded form's fields, in order."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str, default: str = "") -> str:
        """The field's last value (stripped), or ``default``."""
        for k, v in reversed(self.pairs):
            if k == name:
                return v.strip()
        return default

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def values(self, skip: tuple[str, ...] = ("csrf",)) -> dict[str, str]:
        """Every field but the secrets, to give a refused form back as it was sent."""
        return {k: v for k, v in self.pairs if k not in skip}


async def read_form(request: Request) -> Form:
    """An url-encoded form of at most ``FORM_LIMIT`` bytes. (Starlette's own parser needs
    python-multipart, a dependency for a few fields.)"""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > FORM_LIMIT:
            raise FormTooLarge()
    return Form(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def check_csrf(request: Request, sess: ConsoleSession | None, form: Form) -> None:
    """Raises CsrfRefused unless the request is same-origin and (when signed in) carries
    the session's CSRF token."""
    if not same_origin(request):
        raise CsrfRefused("the request did not come from this console's own page")
    if sess is not None:
        given = form.get("csrf") or request.headers.get("x-csrf-token") or ""
        if not secrets.compare_digest(given, sess.csrf):
            raise CsrfRefused("the form's CSRF token is missing or stale: reload the page")
