"""``qmotion server``: run the manager (one replica of it), and ``server db``: its schema."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import typer

from qmotion.cli import config as config_file
from qmotion.cli.common import (
    ACCESS_LOG_OPTION,
    LOG_FORMAT_OPTION,
    err_console,
    listen_address,
    log_format_of,
    service_token,
)

app = typer.Typer(help="Run the manager, and look after its database.")
db_app = typer.Typer(no_args_is_help=True, help="The manager's database: its schema revision.")
app.add_typer(db_app, name="db")
DEFAULT_DB = "sqlite:////var/lib/qmotion/manager.db"
DB_OPTION = typer.Option(
    DEFAULT_DB,
    "--db",
    help="SQLAlchemy URL: SQLite by default (one manager); postgresql+psycopg://... for "
    "several replicas (see the README's 'Run it highly available').",
)


@app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    config: Path = config_file.option(config_file.ETC / "manager.toml", "the manager"),
    listen: str = typer.Option("127.0.0.1:8000", "--listen", help="ADDRESS:PORT to serve on."),
    db: str = DB_OPTION,
    replica: str = typer.Option(
        None,
        "--replica",
        help="This process's name among the managers on the database (default: "
        "HOSTNAME:PORT). Keep it across restarts: a restarted replica resumes its own tasks "
        "at once, not a lease later.",
    ),
    lease_s: float = typer.Option(
        10.0,
        "--lease",
        min=1.0,
        max=300.0,
        help="Seconds a replica's tasks and the leader's rounds are held without renewal; "
        "a replica that stops is taken over after this (within two).",
    ),
    token_file: Path = typer.Option(
        None, "--token-file", help="Bearer token file (or QMOTION_TOKEN)."
    ),
    ca_dir: Path = typer.Option(
        Path("/var/lib/qmotion/ca"),
        "--ca-dir",
        help="The cluster CA (made on first start): it signs each host's certificate at "
        "registration, and migration streams are mutual TLS under it.",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="LAB ONLY: plain HTTP API, plaintext migration streams, agents calling each "
        "other by token (reports say tls: false). Only for networks nobody else can reach.",
    ),
    log_format: str = LOG_FORMAT_OPTION,
    access_log: bool = ACCESS_LOG_OPTION,
) -> None:
    """Serve the cluster inventory, tasks and the REST API (HTTPS under the cluster CA)."""
    if ctx.invoked_subcommand is not None:
        return
    from qmotion.server.main import run

    fmt = log_format_of(log_format)
    if insecure:
        err_console.print(
            "[bold red]WARNING: --insecure: the API, its tokens and every migration stream "
            "travel in clear. For a lab on a network nobody else can reach, never for "
            "real hosts.[/]"
        )

    token = service_token(token_file, "QMOTION_TOKEN")
    host, port = listen_address(listen)
    _mkdir_for(db)
    # Everything the service writes (database, keys, VM state) is its own only.
    os.umask(0o077)
    name = replica or f"{socket.gethostname()}:{port}"
    run(
        db,
        token,
        host,
        port,
        None if insecure else ca_dir,
        fmt,
        access_log,
        replica=name,
        lease_s=lease_s,
    )


@db_app.command("upgrade")
def db_upgrade(db: str = DB_OPTION) -> None:
    """Bring the database's schema to this version's (the manager does it at start too;
    replicas starting together take turns). Every row is kept."""
    from qmotion.server import schema
    from qmotion.server.db import Database

    _mkdir_for(db)
    before = _revision(db)
    database = Database(db)
    database.engine.dispose()
    typer.echo(f"database at revision {schema.head()} (was {before or 'empty'})")


@db_app.command("status")
def db_status(db: str = DB_OPTION) -> None:
    """The schema's revision against this version's, and the manager replicas with their
    leases (a replica whose lease ended has stopped or lost the database)."""
    from qmotion.server import schema
    from qmotion.server.db import Database, utcnow
    from qmotion.server.replicas import leader, replica_list

    revision = _revision(db)
    typer.echo(f"schema: {revision or 'empty'} (this version: {schema.head()})")
    if revision != schema.head():
        raise typer.Exit(1)
    database = Database(db, upgrade=False)
    now = utcnow()
    lead = leader(database)
    for r in replica_list(database):
        left = (r.expires_at - now).total_seconds()
        state = f"lease {left:.1f} s left" if left > 0 else f"lease ended {-left:.0f} s ago"
        mark = " (leader)" if lead == (r.name, r.epoch) else ""
        typer.echo(f"replica {r.name}{mark}: epoch {r.epoch}, {state}, at {r.address or '-'}")
    database.engine.dispose()


def _revision(db: str) -> str | None:
    from sqlalchemy import create_engine

    from qmotion.server import schema

    name = db.removeprefix("sqlite:///").split("?", 1)[0]
    if db.startswith("sqlite:///") and not Path(name).exists():
        return None  # not made here: the manager makes it private (0600)
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return schema.current(conn)
    finally:
        engine.dispose()


def _mkdir_for(db: str) -> None:
    if db.startswith("sqlite:///"):
        Path(db.removeprefix("sqlite:///")).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
