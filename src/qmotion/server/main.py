"""Runs the manager process: database, API, task runner, until a signal."""

from __future__ import annotations

import logging

import uvicorn

from qmotion.server.app import create_app


def run(db_url: str, token: str, host: str, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(db_url, token), host=host, port=port, log_level="warning", access_log=False
    )
