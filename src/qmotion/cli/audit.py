"""``qmotion audit``: every state-changing call to the manager, who made it and how it ended."""

from __future__ import annotations

import typer
from rich.table import Column, Table
from rich.text import Text

from qmotion.cli.common import cells, console, errors_exit, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(help="The manager's audit log (admin).", no_args_is_help=True)


@app.command("list")
def list_(
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="rows per page"),
    after: int = typer.Option(None, "--after", min=1, help="continue below this row id"),
    user: str = typer.Option(None, "--user", help="only this user's calls"),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = typer.Option(None, "--lab", help="Which lab's manager, if several are up."),
) -> None:
    """Newest first: when, who (role), what, status and outcome, the task it started."""
    with errors_exit(), server_client(lab) as client:
        rows, cursor = client.audit(limit=limit, after=after, user=user)
    if json_out:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    # Who, when and the call whole on one line; the caller's address is in --json.
    table = Table(
        "id",
        Column("when (UTC)", no_wrap=True),
        Column("who", no_wrap=True),
        Column("call", no_wrap=True),
        Column("status", no_wrap=True),
        "task",
    )
    for r in rows:
        who = f"{r.user} ({r.role.value})" if r.user and r.role else "-"
        table.add_row(
            *cells(
                r.id,
                f"{r.at:%m-%d %H:%M:%S}",
                who,
                f"{r.method} {r.path}",
                f"{r.status} {r.outcome}",
                r.task_id or "-",
            )
        )
    console.print(table)
    if cursor is not None:
        console.print(Text(f"more: --after {cursor}", style="dim"))
