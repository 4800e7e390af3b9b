"""``qmotion host``: the hosts the manager knows."""

from __future__ import annotations

import typer
from rich.table import Table

from qmotion.cli.common import cells, console, errors_exit, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(help="Hosts registered with the manager.")


@app.command("list")
def list_(
    json_out: bool = typer.Option(False, "--json"), lab: str = typer.Option(None, "--lab")
) -> None:
    """Hosts with their state, accelerator and committed memory."""
    with errors_exit(), server_client(lab) as client:
        hosts = client.hosts()
    if json_out:
        print_json([h.model_dump(mode="json") for h in hosts])
        return
    table = Table("name", "state", "accel", "memory", "committed", "VMs")
    for h in hosts:
        table.add_row(
            *cells(
                h.name,
                h.state,
                h.facts.accel.name if h.facts else "?",
                f"{h.memory_mib} MiB",
                f"{h.committed_mib} MiB",
                ", ".join(h.vms),
            )
        )
    console.print(table)
