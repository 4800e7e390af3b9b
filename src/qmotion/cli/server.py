"""``qmotion server``: run the manager."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from qmotion.cli.common import fail


def server(
    listen: str = typer.Option("127.0.0.1:8000", "--listen", help="ADDRESS:PORT to serve on."),
    db: str = typer.Option(
        "sqlite:////var/lib/qmotion/manager.db", "--db", help="SQLAlchemy URL (SQLite by default)."
    ),
    token_file: Path = typer.Option(
        None, "--token-file", help="Bearer token file (or QMOTION_TOKEN)."
    ),
) -> None:
    """Serve the cluster inventory, tasks and the REST API."""
    from qmotion.server.main import run

    token = os.environ.get("QMOTION_TOKEN", "")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file: {exc}", 2)
    if len(token) < 16:
        fail("a bearer token of at least 16 characters is required", 2)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        fail(f"--listen must be ADDRESS:PORT, got {listen!r}", 2)
    if db.startswith("sqlite:///"):
        Path(db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    run(db, token, host, int(port))
