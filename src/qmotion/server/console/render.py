"""The console's pages: Jinja2 templates from the package, the caller's role, the headers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse

from qmotion.api.sizes import format_size
from qmotion.server.access import Identity, required_role
from qmotion.server.console import views

# Only our own origin, and no inline script or style: a VM name or a health reason that
# carried markup past the escaping still could not run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def _static_versions() -> dict[str, str]:
    """A digest per static file, in its URL: a new release is never served from a stale
    cache, and the files can be cached for long."""
    out = {}
    for f in resources.files("qmotion.server.console").joinpath("static").iterdir():
        if f.is_file():
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    return out


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _millis(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _size(v: float | None) -> str:
    return "-" if v is None else format_size(v)


@dataclass(frozen=True)
class Caller:
    who: Identity
    csrf: str

    def can(self, method: str, route: str) -> bool:
        """Whether the API would let this caller do ``method route``: the console offers
        only what the caller may do, and checks again when it is done."""
        return self.who.role.allows(required_role(method, route))


class Renderer:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("qmotion.server.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        versions = _static_versions()
        self.env.globals.update(
            static=lambda name: f"/ui/static/{name}?v={versions.get(name, '0')}",
            size=_size,
            seconds=_seconds,
            millis=_millis,
            task_title=views.task_title,
            datastores=views.vm_datastores,
        )

    def page(
        self,
        template: str,
        caller: Caller | None,
        context: Mapping[str, Any],
        status: int = 200,
    ) -> HTMLResponse:
        ctx: dict[str, Any] = {
            "who": caller.who if caller else None,
            "csrf": caller.csrf if caller else "",
            "can": caller.can if caller else (lambda _m, _r: False),
            "error": None,
            "error_title": None,
            "notice": None,
            "nav": "",
            "title": "qmotion",
        }
        ctx.update(context)
        html = self.env.get_template(template).render(ctx)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def fragment(self, template: str, context: Mapping[str, Any]) -> str:
        return self.env.get_template(template).render(dict(context))


def to_login(request: Request) -> RedirectResponse:
    """A signed-out visitor to the sign-in, coming back here after it."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(here, safe='')}", status_code=303)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: only a console path of ours (never another site)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"
