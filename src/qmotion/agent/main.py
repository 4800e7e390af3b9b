"""Runs one agent process: configuration in, uvicorn serving the API until a signal."""

from __future__ import annotations

import socket

import uvicorn

from qmotion import logs
from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig
from qmotion.agent.tls import TlsStore, listening_socket
from qmotion.logs import LogFormat

SHUTDOWN_GRACE_S = 2  # in-flight calls then end; a restarted agent settles what they did


def _listen(address: str, port: int) -> socket.socket:
    sock = listening_socket(address, port)
    sock.set_inheritable(True)
    return sock


def run(
    config: AgentConfig,
    host: str,
    port: int,
    log_format: LogFormat = "text",
    access_log: bool = True,
) -> None:
    logs.configure(log_format)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # The management address and every migration address: the path probe then measures the
    # route a migration stream to that address takes.
    addresses = [host, *(a for a in config.migration_addresses if a != host)]
    sockets = [_listen(a, port) for a in addresses]
    store = TlsStore(config.state_dir, config.name)
    tls = store.control_server_options() if store.control_tls else {}
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        # The manager keeps its mutual-TLS connections open between calls: an idle one
        # never answers the TLS close at shutdown, and uvicorn would wait for it (~10 s).
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        **logs.uvicorn_options(access_log),
        **tls,  # type: ignore[arg-type]
    )
    uv_config.load()
    # Kept, so that a renewed certificate (PUT /v1/tls) serves the next handshakes.
    app.state.agent.control_ssl = uv_config.ssl
    server = uvicorn.Server(uv_config)
    server.run(sockets=sockets)
