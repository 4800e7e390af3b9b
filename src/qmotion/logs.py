"""How the manager and the agent log: one line per record, as text or as one JSON object.

Both services send every logger, uvicorn's access log included, through the root logger's one
handler, so a line has the same shape whichever library wrote it. JSON lines carry ``time``
(UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``message``, ``exception`` (the
traceback) when one was logged, and an access line's ``client``, ``method``, ``path`` and
``status`` besides its message, for a log pipeline to index.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "uvicorn.access"
# uvicorn's access record: its message's arguments, in this order.
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        args = record.args
        if (
            record.name == ACCESS_LOGGER
            and isinstance(args, tuple)
            and len(args) == len(ACCESS_FIELDS)
        ):
            fields = dict(zip(ACCESS_FIELDS, args, strict=True))
            fields.pop("http_version")
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument need not be JSON (it is already in the message).
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(fmt: LogFormat, stream: TextIO | None = None) -> None:
    """The process's logging: INFO and above to ``stream`` (stderr) in ``fmt``; httpx's
    per-request lines are left out (the agents' calls are the manager's own business)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # uvicorn's loggers through the same handler, whatever configured them before.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.disabled = False


def uvicorn_options(access_log: bool) -> dict[str, Any]:
    """What a service hands uvicorn: no logging configuration of its own (its loggers go
    through the root handler, one format for every line), INFO (its access log is INFO),
    and no proxy headers: a caller's address is the connection's (the audit, the peer port's
    source check), never what an X-Forwarded-For says."""
    return {
        "log_config": None,
        "log_level": "info",
        "access_log": access_log,
        "proxy_headers": False,
    }
