"""Mounts the console on the manager's app: its pages, forms, stream, static files, errors."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from qmotion.server.console import session
from qmotion.server.console.actions import install_actions
from qmotion.server.console.base import Console
from qmotion.server.console.pages import install_pages
from qmotion.server.console.render import HEADERS, safe_next, to_login
from qmotion.server.console.stream import install_stream
from qmotion.server.console.wizard import install_wizard


def install_console(app: FastAPI, console: Console) -> None:
    install_pages(app, console)
    install_wizard(app, console)
    install_actions(app, console)
    install_stream(app, console)
    app.mount(
        "/ui/static",
        StaticFiles(packages=[("qmotion.server.console", "static")]),
        name="console-static",
    )

    @app.exception_handler(session.SignedOut)
    async def _signed_out(request: Request, exc: Exception) -> Response:
        # A page goes to the sign-in and back; a form posted after the session ended goes
        # to the sign-in and back to the page it was sent from; a stream gets 401.
        if request.url.path.endswith("/events"):
            return HTMLResponse("signed out: sign in again", status_code=401, headers=HEADERS)
        if request.method == "GET":
            return to_login(request)
        back = urlsplit(request.headers.get("referer", ""))
        page = safe_next(back.path + (f"?{back.query}" if back.query else ""))
        return RedirectResponse(f"/ui/login?next={quote(page, safe='')}", status_code=303)

    @app.exception_handler(session.CsrfRefused)
    async def _csrf(request: Request, exc: Exception) -> Response:
        return HTMLResponse(f"refused: {exc}", status_code=403, headers=HEADERS)

    @app.exception_handler(session.FormTooLarge)
    async def _too_large(request: Request, exc: Exception) -> Response:
        return HTMLResponse("refused: the form is too large", status_code=413, headers=HEADERS)
