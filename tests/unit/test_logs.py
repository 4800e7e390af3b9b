"""The services' logs: text or one JSON object a line, the access log included and on.

uvicorn's access log goes through the same handler (a real uvicorn serving real requests).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from qmotion import logs
from qmotion.cli.main import app as cli_app


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The root logger writing to a buffer; its handlers, level and httpx's put back after.
    The records come from loggers outside ``qmotion``: other tests quieten that one."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("httpx").level)
    # uvicorn with the access log off detaches its logger for the process: put it back.
    access = logging.getLogger(logs.ACCESS_LOGGER)
    access_saved = (access.propagate, list(access.handlers))
    out = io.StringIO()
    yield out
    access.propagate, access.handlers = access_saved
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    logging.getLogger("httpx").setLevel(saved[2])


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_and_the_exception(
    stream: io.StringIO,
) -> None:
    logs.configure("json", stream)
    log = logging.getLogger("tests.logs.runner")
    log.info("task %d of %s: %s", 7, "vm0", 'a "quoted" word\nand a second line')
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("task %d crashed", 8)
    logging.getLogger("httpx").info("HTTP Request: GET http://agent")  # left out
    first, second = lines(stream)
    assert first["level"] == "INFO" and first["logger"] == "tests.logs.runner"
    assert first["message"] == 'task 7 of vm0: a "quoted" word\nand a second line'
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert "exception" not in first
    assert second["level"] == "ERROR" and second["message"] == "task 8 crashed"
    assert second["exception"].startswith("Traceback")
    assert "ZeroDivisionError: division by zero" in second["exception"]


def test_text_lines_are_as_before(stream: io.StringIO) -> None:
    logs.configure("text", stream)
    logging.getLogger("tests.logs.agent").warning("peer TLS port not serving: %s", "no cert")
    line = stream.getvalue()
    assert line.endswith(" WARNING tests.logs.agent: peer TLS port not serving: no cert\n")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def _serve(app: FastAPI, access_log: bool, requests: list[str]) -> None:
    """A real uvicorn with the services' options, on a free port, for ``requests``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **logs.uvicorn_options(access_log)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        for path in requests:
            httpx.get(f"http://127.0.0.1:{port}{path}")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_access_log_is_on_and_json_like_every_other_line(stream: io.StringIO) -> None:
    app = FastAPI()

    @app.get("/v1/tasks")
    def tasks() -> list[int]:
        return []

    logs.configure("json", stream)
    _serve(app, True, ["/v1/tasks?limit=5", "/nowhere"])
    got = lines(stream)
    access = [x for x in got if x["logger"] == "uvicorn.access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/v1/tasks?limit=5", 200),
        ("GET", "/nowhere", 404),
    ]
    assert access[0]["client"].startswith("127.0.0.1:")
    assert '"GET /v1/tasks?limit=5 HTTP/1.1" 200' in access[0]["message"]
    # uvicorn's own lines too: the server's start, in the same shape.
    assert any(x["logger"] == "uvicorn.error" and x["level"] == "INFO" for x in got)

    stream.truncate(0)
    stream.seek(0)
    _serve(app, False, ["/v1/tasks"])
    assert not [x for x in lines(stream) if x["logger"] == "uvicorn.access"]


@pytest.mark.parametrize("command", ["server", "agent"])
def test_an_unknown_log_format_is_refused(command: str) -> None:
    args = [command, "--log-format", "xml", *(["--name", "h1"] if command == "agent" else [])]
    res = CliRunner().invoke(cli_app, args, env={"QMOTION_TOKEN": "t" * 16})
    assert res.exit_code == 2
    assert "--log-format must be one of text, json, got 'xml'" in res.stderr
