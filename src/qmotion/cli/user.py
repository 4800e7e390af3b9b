"""``qmotion user``: who may call the manager (viewer, operator, admin) and their API tokens."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from qmotion.api.access import Role
from qmotion.cli.common import cells, console, errors_exit, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(
    help="Users of the manager's API and their roles: viewer reads; operator also runs VMs, "
    "migrations, maintenance, DRS and schedules; admin also manages hosts, users, tokens, "
    "cluster settings and reads the audit log.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="A user's API tokens (shown once, kept only as a hash).")
app.add_typer(token_app, name="token")
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")
JsonOpt = typer.Option(False, "--json")


@app.command("add")
def add(
    name: str,
    role: Role = typer.Option(..., "--role", help="viewer, operator or admin"),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Add a user with a role (then give them a token: `qmotion user token create NAME`)."""
    with errors_exit(), server_client(lab) as client:
        user = client.add_user(name, role)
    if json_out:
        print_json(user.model_dump(mode="json"))
    else:
        console.print(Text(f"user {user.name} added as {user.role.value}"))


@app.command("list")
def list_(json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Users with their roles and how many live tokens each has."""
    with errors_exit(), server_client(lab) as client:
        users = client.users()
    if json_out:
        print_json([u.model_dump(mode="json") for u in users])
        return
    table = Table("name", "role", "tokens", "created")
    for u in users:
        table.add_row(*cells(u.name, u.role.value, u.tokens, f"{u.created_at:%Y-%m-%d %H:%M}"))
    console.print(table)


@app.command("remove")
def remove(name: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Remove a user; every token of theirs stops working at once (audit rows stay)."""
    with errors_exit(), server_client(lab) as client:
        client.remove_user(name)
    if json_out:
        print_json({"deleted": name})
    else:
        console.print(Text(f"user {name} removed"))


@app.command("whoami")
def whoami(json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """The user and role the CLI's token stands for."""
    with errors_exit(), server_client(lab) as client:
        me = client.whoami()
    if json_out:
        print_json(me.model_dump(mode="json"))
    else:
        console.print(Text(f"{me.user} ({me.role.value})"))


@token_app.command("create")
def token_create(
    user: str,
    label: str = typer.Option("", "--label", help="what the token is for"),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Make a token for USER and print it once (only its hash is kept)."""
    with errors_exit(), server_client(lab) as client:
        tok = client.create_token(user, label)
    if json_out:
        print_json(tok.model_dump(mode="json"))
        return
    console.print(Text(f"token {tok.id} for {tok.user} (shown once, keep it secret):"))
    print(tok.token)  # plain stdout, nothing around it: for `$(...)` and files


@token_app.command("list")
def token_list(user: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """USER's tokens: id, label, prefix, last use, revoked."""
    with errors_exit(), server_client(lab) as client:
        tokens = client.tokens(user)
    if json_out:
        print_json([t.model_dump(mode="json") for t in tokens])
        return
    table = Table("id", "label", "prefix", "created", "last used", "revoked")
    for t in tokens:
        table.add_row(
            *cells(
                t.id,
                t.label or "-",
                t.prefix,
                f"{t.created_at:%Y-%m-%d %H:%M}",
                f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never",
                f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "-",
            )
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Revoke a token by id: the next call with it is refused."""
    with errors_exit(), server_client(lab) as client:
        tok = client.revoke_token(token_id)
    if json_out:
        print_json(tok.model_dump(mode="json"))
    else:
        console.print(Text(f"token {tok.id} of {tok.user} revoked"))
