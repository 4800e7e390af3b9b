"""``qmotion task``: list, show and cancel long operations."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qmotion.cli.common import cells, console, errors_exit, print_json
from qmotion.cli.connect import server_client
from qmotion.cli.vm import stats_line

app = typer.Typer(help="Tasks: every long operation, persisted with its progress and events.")
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Recent tasks, newest first."""
    with errors_exit(), server_client(lab) as client:
        tasks = client.tasks()
    if json_out:
        print_json([t.model_dump(mode="json") for t in tasks])
        return
    table = Table("id", "kind", "state", "vm", "from", "to", "phase", "progress")
    for t in tasks:
        table.add_row(
            *cells(
                t.id,
                t.kind,
                t.state,
                t.vm or "-",
                t.source or "-",
                t.destination or "-",
                t.phase or "-",
                f"{t.progress:.0%}",
            )
        )
    console.print(table)


@app.command("show")
def show(task_id: int, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """One task with its events and result."""
    with errors_exit(), server_client(lab) as client:
        t = client.task(task_id)
    if json_out:
        print_json(t.model_dump(mode="json"))
        return
    console.print(Text(f"task {t.id} {t.kind} {t.vm}: {t.state} ({t.phase}) {t.progress:.0%}"))
    if t.error:
        console.print(f"[red]error:[/] {escape(t.error)}")
    if t.stats is not None and t.state.active:
        console.print(Text(f"  now: {stats_line(t)}"))
    for e in t.events:
        console.print(Text(f"  {e.at:%H:%M:%S.%f} {e.kind}: {e.message}"))
    if t.result:
        print_json(t.result.model_dump(mode="json"))


@app.command("cancel")
def cancel(task_id: int, lab: str = LabOpt) -> None:
    """Cancel a queued or running task; a cancelled migration leaves the VM on its source."""
    with errors_exit(), server_client(lab) as client:
        t = client.cancel_task(task_id)
    console.print(Text(f"task {t.id}: cancel requested ({t.state})"))
