"""Runs one agent process: configuration in, uvicorn serving the API until a signal."""

from __future__ import annotations

import logging

import uvicorn

from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig


def run(config: AgentConfig, host: str, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
