"""Runs one agent process: configuration in, uvicorn serving the API until a signal."""

from __future__ import annotations

import logging
import socket

import uvicorn

from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.set_inheritable(True)
    return sock


def run(config: AgentConfig, host: str, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # The management address and every migration address: the path probe then measures the
    # route a migration stream to that address takes.
    addresses = [host, *(a for a in config.migration_addresses if a != host)]
    sockets = [_listen(a, port) for a in addresses]
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_level="warning", access_log=False)
    )
    server.run(sockets=sockets)
