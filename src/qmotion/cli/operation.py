"""Waiting for a DRS operation task (apply, maintenance) and printing its per-VM report."""

from __future__ import annotations

import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from qmotion.api.server import TaskOut
from qmotion.cli.common import cells, console, print_json
from qmotion.client.server import ServerClient

POLL_S = 0.5
WAIT_S = 6 * 3600.0  # --wait: every migration ends by itself well before


def wait(client: ServerClient, task_id: int, title: str, timeout_s: float) -> TaskOut:
    """Until the task ends (or ``timeout_s``), with a progress bar on a terminal."""
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        row = bar.add_task(title, total=1.0)
        while True:
            t = client.task(task_id)
            bar.update(row, completed=t.progress)
            if not t.state.active or time.monotonic() > deadline:
                return t
            time.sleep(POLL_S)


def show(t: TaskOut, json_out: bool) -> None:
    if json_out:
        print_json(t.model_dump(mode="json"))
        return
    op = t.operation
    console.print(Text(f"task {t.id} {t.kind}: {t.state}"))
    if op is not None:
        table = Table("VM", "from", "to", "outcome", "task", "reason")
        for m in op.moves:
            table.add_row(
                *cells(m.vm, m.source, m.target or "-", m.outcome, m.task_id or "-", m.reason or "")
            )
        console.print(table)
        if op.spread:
            spread = ", ".join(f"{h}: {n}" for h, n in op.spread.items())
            console.print(Text(f"moved per host: {spread}; {op.wall_ms / 1000:.1f} s"))
        if op.remaining:
            console.print(Text(f"still on {op.host}: {', '.join(op.remaining)}"))
    if t.error:
        console.print(Text(f"error: {t.error}", style="red"))
