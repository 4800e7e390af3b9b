"""Runs the manager process: database, API, task runner, until a signal."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from qmotion import logs
from qmotion.logs import LogFormat
from qmotion.pki import ClusterCA
from qmotion.server.http.app import create_app


def run(
    db_url: str,
    token: str,
    host: str,
    port: int,
    ca_dir: Path | None,
    log_format: LogFormat = "text",
    access_log: bool = True,
) -> None:
    """``ca_dir``: where the cluster CA lives (made on first start); None: insecure."""
    logs.configure(log_format)
    uvicorn.run(
        create_app(db_url, token, ca=ClusterCA.load_or_create(ca_dir) if ca_dir else None),
        host=host,
        port=port,
        **logs.uvicorn_options(access_log),
    )
