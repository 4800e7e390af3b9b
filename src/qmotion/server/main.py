"""Runs the manager process: database, API, task runner, until a signal."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from qmotion.pki import ClusterCA
from qmotion.server.http.app import create_app


def run(db_url: str, token: str, host: str, port: int, ca_dir: Path | None) -> None:
    """``ca_dir``: where the cluster CA lives (made on first start); None: insecure."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(db_url, token, ca=ClusterCA.load_or_create(ca_dir) if ca_dir else None),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )
