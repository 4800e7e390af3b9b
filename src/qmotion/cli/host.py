"""``qmotion host``: the hosts the manager knows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import typer
from rich.text import Text

from qmotion.api.drs import MaintenanceOut
from qmotion.api.server import HostOut
from qmotion.cli import operation
from qmotion.cli.common import console, data_table, errors_exit, fail, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(help="Hosts registered with the manager.")
maintenance = typer.Typer(help="Maintenance mode: evacuate a host, take no new VMs, come back.")
app.add_typer(maintenance, name="maintenance")
WaitOpt = typer.Option(
    False, "--wait", help="return when it is done (exit 1 if a VM could not move)"
)


LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


@app.command("add")
def add(
    name: str,
    address: str = typer.Option(..., "--address", help="The host's IPv4 address."),
    port: int = typer.Option(8100, "--port", help="Its agent's port."),
    migration_address: list[str] = typer.Option(
        [],
        "--migration-address",
        help="An address it receives migrations on (repeatable): with --address, all its "
        "certificate may name.",
    ),
    ttl: int = typer.Option(3600, "--ttl", help="Seconds the join token stays good (60..604800)."),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Admit a new host: prints the one-time `qmotion agent join` command to run on it."""
    from pydantic import ValidationError

    from qmotion.api.enrol import JoinTokenCreate

    try:
        req = JoinTokenCreate.model_validate(
            {
                "name": name,
                "address": address,
                "port": port,
                "ttl_s": ttl,
                "migration_addresses": migration_address,
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else ""
        field = {"ttl_s": "ttl", "migration_addresses": "migration-address"}.get(loc, loc)
        fail(f"--{field}: {err['msg']}" if field != "name" else f"NAME: {err['msg']}", 2)
    with errors_exit(), server_client(lab) as client:
        out = client.create_join_token(req)
    if json_out:
        print_json(out.model_dump(mode="json"))
        return
    console.print(
        Text(f"Run this on {out.host} (good once, until {out.expires_at:%Y-%m-%d %H:%M} UTC):")
    )
    print(out.command)  # plain stdout: copied as a whole, never wrapped


@app.command("remove")
def remove(name: str, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Forget a host that has no VMs (evacuate it first: `host maintenance enter`)."""
    with errors_exit(), server_client(lab) as client:
        client.remove_host(name)
    if json_out:
        print_json({"deleted": name})
    else:
        console.print(Text(f"host {name} removed"))


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Hosts with their state, accelerator and committed memory."""
    with errors_exit(), server_client(lab) as client:
        hosts = client.hosts()
    if json_out:
        print_json([h.model_dump(mode="json") for h in hosts])
        return
    now = datetime.now(UTC)
    rows = [
        [
            h.name,
            h.state,
            h.facts.health if h.facts else "?",
            h.facts.accel.name if h.facts else "?",
            h.facts.agent_version if h.facts else "?",
            f"{h.memory_mib} MiB",
            f"{h.committed_mib} MiB",
            ", ".join(h.vms),
            "; ".join(_notes(h, now)),
        ]
        for h in hosts
    ]
    headers = ["name", "state", "health", "accel", "version", "memory", "committed", "VMs", "note"]
    console.print(
        data_table(headers, rows, copied=("name",), droppable=("version", "accel", "committed"))
    )


CERT_WARN_DAYS = 30


def _notes(h: HostOut, now: datetime) -> list[str]:
    """Why the host needs a look: maintenance, failing checks, a certificate ending soon."""
    notes = [h.maintenance_reason] if h.maintenance_reason else []
    if h.facts is not None:
        notes += h.facts.health_reasons
        ends = h.facts.cert_not_after
        if ends is not None and ends - now < timedelta(days=CERT_WARN_DAYS):
            when = "ENDED" if ends <= now else "ends"
            notes.append(f"certificate {when} {ends:%Y-%m-%d}: qmotion cluster rotate-certs")
    return notes


def _finish(out: MaintenanceOut, wait: bool, json_out: bool, lab: str | None, title: str) -> None:
    if not wait or out.task_id is None:
        if json_out:
            print_json(out.model_dump(mode="json"))
        else:
            console.print(Text(f"{out.host} is {out.state}: task {out.task_id}"))
        return
    with errors_exit(), server_client(lab) as client:
        t = operation.wait(client, out.task_id, title, operation.WAIT_S)
    operation.show(t, json_out)
    if t.state != "succeeded":
        raise typer.Exit(1)


@maintenance.command("enter")
def enter(
    host: str,
    wait: bool = WaitOpt,
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Take no new VMs on HOST and evacuate its VMs, spread by DRS (rules and capacity kept)."""
    with errors_exit(), server_client(lab) as client:
        out = client.enter_maintenance(host)
    _finish(out, wait, json_out, lab, f"evacuating {host}")


@maintenance.command("exit")
def exit_(
    host: str,
    return_vms: bool = typer.Option(
        False, "--return", help="move the VMs the maintenance evacuated back"
    ),
    wait: bool = WaitOpt,
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Put HOST back in service (always possible, also while it is being evacuated)."""
    with errors_exit(), server_client(lab) as client:
        out = client.exit_maintenance(host, return_vms=return_vms)
    _finish(out, wait, json_out, lab, f"{host} back in service")


@maintenance.command("status")
def status(host: str, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """HOST's state, its maintenance task and why it is not empty yet."""
    with errors_exit(), server_client(lab) as client:
        out = client.maintenance(host)
    if json_out:
        print_json(out.model_dump(mode="json"))
    else:
        console.print(Text(f"{out.host}: {out.state}; task {out.task_id}; {out.reason or ''}"))
