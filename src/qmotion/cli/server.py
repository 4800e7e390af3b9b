"""``qmotion server``: run the manager."""

from __future__ import annotations

import os
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


def server(
    config: Path = config_file.option(config_file.ETC / "manager.toml", "the manager"),
    listen: str = typer.Option("127.0.0.1:8000", "--listen", help="ADDRESS:PORT to serve on."),
    db: str = typer.Option(
        "sqlite:////var/lib/qmotion/manager.db", "--db", help="SQLAlchemy URL (SQLite by default)."
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
    if db.startswith("sqlite:///"):
        Path(db.removeprefix("sqlite:///")).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Everything the service writes (database, keys, VM state) is its own only.
    os.umask(0o077)
    run(db, token, host, port, None if insecure else ca_dir, fmt, access_log)
