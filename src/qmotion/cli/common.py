"""What every command shares: printing errors the same way and exiting with a status.

Nothing printed from data is reinterpreted: the consoles substitute no emoji codes (a MAC's
``:cd:``) and highlight nothing, and data reaches Rich either as ``rich.text.Text`` (see
``cells``) or ``rich.markup.escape``d inside our own markup, so ``[bold]`` or ``[/]`` in a name
or a message prints as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from qmotion.api.errors import describe
from qmotion.client.errors import ApiError
from qmotion.errors import QmotionError
from qmotion.logs import LOG_FORMATS, LogFormat

console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)


def cells(*values: object) -> list[Text]:
    """A table row of data, each cell printed literally (never read as markup)."""
    return [Text(str(v)) for v in values]


def data_table(
    headers: list[str],
    rows: list[list[str]],
    copied: Collection[str] = (),
    droppable: Sequence[str] = (),
) -> Table:
    """A table of data whose ``copied`` columns (names, addresses, MACs: values operators copy)
    are printed whole on one line: when the console is too narrow for every column, the
    ``droppable`` ones go first, in that order (the caller sees which in ``table.columns``),
    then the other columns wrap, to a letter a line if need be. Nothing is ever cut to an
    ellipsis: on a console too narrow even for the copied values alone, they fold too."""

    def width(header: str) -> int:
        values = [header, *(r[headers.index(header)] for r in rows)]
        if header in copied:
            return max(len(v) for v in values)
        return max(len(w) for v in values for w in v.split() or [""])  # wraps at spaces

    def fits(columns: list[str], squeezed: bool = False) -> bool:
        # Rich's box: a rule before each column and after the last, a space each side.
        need = sum((width(h) if h in copied or not squeezed else 1) + 3 for h in columns)
        return need + 1 <= console.width

    shown = list(headers)
    for header in (h for h in droppable if h in headers):
        if fits(shown):
            break
        shown.remove(header)
    whole = fits(shown, squeezed=True)
    # Unwrapped, Rich would crop a value wider than its column: only while they all fit.
    table = Table(*(Column(h, no_wrap=whole and h in copied, overflow="fold") for h in shown))
    for r in rows:
        table.add_row(*cells(*(r[headers.index(h)] for h in shown)))
    return table


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` (plain text, printed literally) as an error and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextlib.contextmanager
def errors_exit() -> Iterator[None]:
    """qmotion errors become one clear line on stderr and a non-zero exit, not a traceback."""
    try:
        yield
    except ApiError as exc:
        fail(describe(exc.detail), 2 if exc.status in (409, 422, 404, 401) else 1)
    except QmotionError as exc:
        fail(str(exc))
    except ValidationError as exc:
        # An option the API model refuses (e.g. --timeout 5): the field and why, exit 2.
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "input"
        fail(f"{where}: {first['msg']}", 2)


def more_hint(next_after: str | None) -> None:
    """Under a page of a list: how to get the next one (nothing on the last page)."""
    if next_after is not None:
        console.print(Text(f"more: --after {next_after}", style="dim"))


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def service_token(token_file: Path | None, env: str) -> str:
    """A service's bearer token from ``--token-file`` or the environment; refused if short."""
    token = os.environ.get(env, "")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file: {exc}", 2)
    if len(token) < 16:
        fail(f"a bearer token of at least 16 characters is required (--token-file or {env})", 2)
    return token


# A service's logging options (``qmotion server`` and ``qmotion agent``).
LOG_FORMAT_OPTION = typer.Option(
    "text",
    "--log-format",
    help="text, or json: one JSON object a line (time, level, logger, message, exception).",
)
ACCESS_LOG_OPTION = typer.Option(
    True, "--access-log/--no-access-log", help="Log every HTTP request (one line each)."
)


def log_format_of(value: str) -> LogFormat:
    if value not in LOG_FORMATS:
        fail(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {value!r}", 2)
    return "json" if value == "json" else "text"


def listen_address(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        fail(f"--listen must be ADDRESS:PORT, got {listen!r}", 2)
    return host, int(port)
