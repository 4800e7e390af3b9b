"""``qmotion rule``: placement rules (affinity, anti-affinity, run-on, not-run-on), persisted."""

from __future__ import annotations

import typer
from pydantic import ValidationError
from rich.table import Table

from qmotion.api.drs import RuleCreate, RuleOut
from qmotion.cli.common import cells, console, errors_exit, fail, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(
    help="Placement rules: enforced on migrate, create, maintenance and by DRS.",
    no_args_is_help=True,
)
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _table(rules: list[RuleOut]) -> Table:
    table = Table("name", "kind", "strength", "VMs", "hosts", "broken by", "missing VMs")
    for r in rules:
        table.add_row(
            *cells(
                r.name,
                r.kind,
                r.strength,
                ", ".join(r.vms),
                ", ".join(r.hosts) or "-",
                ", ".join(r.broken_by) or "-",
                ", ".join(r.missing_vms) or "-",
            )
        )
    return table


@app.command("create")
def create(
    name: str,
    kind: str = typer.Option(..., "--kind", help="affinity, anti-affinity, run-on, not-run-on"),
    vms: str = typer.Option(..., "--vms", help="a,b,..."),
    hosts: str = typer.Option(None, "--hosts", help="h1,h2 (run-on, not-run-on)"),
    must: bool = typer.Option(
        True, "--must/--should", help="must: never broken; should: broken only if nothing fits"
    ),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Create a rule; one that contradicts an existing must rule is refused naming both."""
    try:
        req = RuleCreate.model_validate(
            {
                "name": name,
                "kind": kind,
                "strength": "must" if must else "should",
                "vms": _names(vms),
                "hosts": _names(hosts),
            }
        )
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "rule"
        fail(f"{where}: {e['msg']}", 2)
    with errors_exit(), server_client(lab) as client:
        out = client.create_rule(req)
    if json_out:
        print_json(out.model_dump(mode="json"))
    else:
        console.print(_table([out]))


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Every rule, with the VMs that break it now."""
    with errors_exit(), server_client(lab) as client:
        rules = client.rules()
    if json_out:
        print_json([r.model_dump(mode="json") for r in rules])
    else:
        console.print(_table(rules))


@app.command("show")
def show(name: str, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """One rule."""
    with errors_exit(), server_client(lab) as client:
        r = client.rule(name)
    if json_out:
        print_json(r.model_dump(mode="json"))
    else:
        console.print(_table([r]))


@app.command("delete")
def delete(
    name: str,
    json_out: bool = typer.Option(False, "--json", help='Print {"deleted": NAME}.'),
    lab: str = LabOpt,
) -> None:
    """Delete a rule."""
    with errors_exit(), server_client(lab) as client:
        client.delete_rule(name)
    if json_out:
        print_json({"deleted": name})
        return
    console.print(f"rule {name} deleted", markup=False)
