"""What every command shares: printing errors the same way and exiting with a status."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console

from qmotion.client.errors import ApiError
from qmotion.errors import QmotionError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def errors_exit() -> Iterator[None]:
    """qmotion errors become one clear line on stderr and a non-zero exit, not a traceback."""
    try:
        yield
    except ApiError as exc:
        d = exc.detail
        where = ", ".join(
            f"{k}={v}"
            for k, v in (("vm", d.vm), ("host", d.host), ("field", d.field), ("qmp", d.qmp_class))
            if v
        )
        fail(
            f"{d.message}" + (f" ({where})" if where else "") + f" [{d.code}]",
            2 if exc.status in (409, 422, 404, 401) else 1,
        )
    except QmotionError as exc:
        fail(str(exc))


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
