"""The task page's live progress: server-sent events, pushed as the task's row changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qmotion.api.server import TaskOut
from qmotion.server.console import views
from qmotion.server.console.base import Console
from qmotion.server.console.pages import TaskId
from qmotion.server.console.session import SignedOut
from qmotion.server.errors import NotFound

POLL_S = 0.5  # how often the stream reads the task's row: the browser itself never polls
MAX_STREAM_S = 600.0  # then the browser's EventSource reconnects: no stream lives forever
KEEPALIVE_S = 15.0  # a comment line, so proxies do not close an idle stream
RECHECK_S = 30.0  # how often a stream asks whether its session still holds
# Open task pages per session: under the browser's 6 connections per host (HTTP/1.1), so
# live pages never starve the rest of the console.
MAX_STREAMS = 4
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


_open: dict[str, int] = {}  # streams open per session


class CountedStream(StreamingResponse):
    """Calls ``closed`` once the response ends, however it ends (sent, client gone, error,
    or the body never started)."""

    def __init__(
        self, content: AsyncIterator[bytes], closed: Callable[[], None], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._closed = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._closed()


def event(name: str, data: str, event_id: str | None = None) -> bytes:
    """One SSE event; a data line per line of ``data`` (the protocol's framing)."""
    lines = [f"event: {name}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return ("\n".join(lines) + "\n\n").encode()


def version(t: TaskOut) -> str:
    """What changes when anything the page shows changes."""
    return t.model_dump_json(
        include={"state", "phase", "progress", "stats", "mirror", "operation", "events"}
    )


def install_stream(app: FastAPI, c: Console) -> None:
    @app.get("/ui/tasks/{task_id}/events", include_in_schema=False)
    async def task_events(request: Request, task_id: TaskId) -> Response:
        caller = await asyncio.to_thread(c.caller, request)  # signed out: 401
        try:
            first = await asyncio.to_thread(c.runner.get, task_id)
        except NotFound:
            return Response("no such task", status_code=404)
        key = caller.csrf  # one per session
        if _open.get(key, 0) >= MAX_STREAMS:
            return Response("too many task pages open in this session", status_code=429)
        # Counted now, not when the body starts: a burst of requests cannot all pass.
        _open[key] = _open.get(key, 0) + 1

        def closed() -> None:
            _open[key] -= 1
            if _open[key] <= 0:
                del _open[key]

        async def events() -> AsyncIterator[bytes]:
            t, last, began, quiet = first, "", time.monotonic(), time.monotonic()
            checked = began
            yield b"retry: 2000\n\n"
            while True:
                v = version(t)
                if v != last:
                    last, quiet = v, time.monotonic()
                    ctx = {"task": t, "figures": views.progress_figures(t)}
                    yield event("state", str(t.state))
                    yield event("progress", c.render.fragment("_progress.html", ctx))
                if views.is_final(t):
                    yield event("done", str(t.state))
                    return
                if time.monotonic() - began > MAX_STREAM_S or await request.is_disconnected():
                    return
                if time.monotonic() - checked > RECHECK_S:
                    # A session that ended (signed out, token revoked) stops its streams too.
                    checked = time.monotonic()
                    try:
                        await asyncio.to_thread(c.sessions.caller, request, False)
                    except SignedOut:
                        return
                if time.monotonic() - quiet > KEEPALIVE_S:
                    quiet = time.monotonic()
                    yield b": keepalive\n\n"
                await asyncio.sleep(POLL_S)
                t = await asyncio.to_thread(c.runner.get, task_id)

        return CountedStream(
            events(), closed, media_type="text/event-stream", headers=STREAM_HEADERS
        )
