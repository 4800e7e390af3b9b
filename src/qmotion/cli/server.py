"""``qmotion server``: run the manager."""

from __future__ import annotations

from pathlib import Path

import typer

from qmotion.cli.common import (
    ACCESS_LOG_OPTION,
    LOG_FORMAT_OPTION,
    listen_address,
    log_format_of,
    service_token,
)


def server(
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
        help="Plaintext migration streams, agents calling each other by token (reports say "
        "tls: false). Only for networks nobody else can reach.",
    ),
    log_format: str = LOG_FORMAT_OPTION,
    access_log: bool = ACCESS_LOG_OPTION,
) -> None:
    """Serve the cluster inventory, tasks and the REST API."""
    from qmotion.server.main import run

    fmt = log_format_of(log_format)
    token = service_token(token_file, "QMOTION_TOKEN")
    host, port = listen_address(listen)
    if db.startswith("sqlite:///"):
        Path(db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    run(db, token, host, port, None if insecure else ca_dir, fmt, access_log)
