"""``qmotion cluster``: cluster-wide settings (DRS automation, threshold, interval, ...)."""

from __future__ import annotations

import typer
from rich.table import Table

from qmotion.cli.common import cells, console, errors_exit, fail, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(help="Cluster-wide settings.")
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")
SETTINGS_HELP = (
    "drs.automation=manual|partial|full, drs.threshold=1..5, drs.interval=5m, "
    "drs.max-moves=N, drs.cooldown=1h, drs.proactive=true|false, host.down-grace=60s"
)


def _show(values: dict[str, object]) -> None:
    table = Table("setting", "value")
    for k, v in values.items():
        table.add_row(*cells(k, v))
    console.print(table)


@app.command("show")
def show(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """The cluster's settings."""
    with errors_exit(), server_client(lab) as client:
        st = client.settings()
    if json_out:
        print_json(st.model_dump(mode="json"))
    else:
        _show(st.model_dump(mode="json"))


@app.command("set", help=f"Change settings: KEY=VALUE ... ({SETTINGS_HELP}).")
def set_(
    pairs: list[str] = typer.Argument(..., help="KEY=VALUE"),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    values = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not value:
            fail(f"{p!r}: settings are KEY=VALUE ({SETTINGS_HELP})", 2)
        values[key.strip()] = value.strip()
    with errors_exit(), server_client(lab) as client:
        st = client.set_settings(values)
    if json_out:
        print_json(st.model_dump(mode="json"))
    else:
        _show(st.model_dump(mode="json"))


@app.command("pool")
def pool(
    first: str = typer.Argument(..., help="First address VMs get, e.g. 192.0.2.100"),
    last: str = typer.Argument(..., help="Last address (inclusive)"),
    prefixlen: int = typer.Option(24, "--prefixlen", help="Prefix length of the VMs' addresses."),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Set the address pool VMs get their addresses from when none is given."""
    from pydantic import ValidationError

    from qmotion.api.server import PoolSet

    try:
        req = PoolSet.model_validate({"first": first, "last": last, "prefixlen": prefixlen})
    except ValidationError as exc:
        err = exc.errors()[0]
        fail(f"{err['loc'][0] if err['loc'] else 'pool'}: {err['msg']}", 2)
    with errors_exit(), server_client(lab) as client:
        client.set_pool(req)
    if json_out:
        print_json(req.model_dump(mode="json"))
    else:
        console.print(f"VM addresses: {req.first} - {req.last}/{req.prefixlen}")


@app.command("rotate-certs")
def rotate_certs(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Give every host a new certificate (fresh validity, same key); exit 1 if one was not
    renewed (down or failing): run it again once it is back."""
    with errors_exit(), server_client(lab) as client:
        done = client.rotate_certs()
    if json_out:
        print_json([d.model_dump(mode="json") for d in done])
    else:
        table = Table("host", "certificate ends", "error")
        for d in done:
            ends = f"{d.not_after:%Y-%m-%d}" if d.not_after else "-"
            table.add_row(*cells(d.host, ends, d.error or ""))
        console.print(table)
    if any(d.error for d in done):
        raise typer.Exit(1)
