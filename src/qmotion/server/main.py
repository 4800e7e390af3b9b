"""Runs the manager process: database, API, task runner, until a signal."""

from __future__ import annotations

import socket
from pathlib import Path

import uvicorn

from qmotion import logs
from qmotion.logs import LogFormat
from qmotion.pki import ClusterCA, ManagerTls, serving_certificate
from qmotion.server.http.app import create_app


def run(
    db_url: str,
    token: str,
    host: str,
    port: int,
    ca_dir: Path | None,
    log_format: LogFormat = "text",
    access_log: bool = True,
    replica: str = "local",
    lease_s: float = 10.0,
) -> None:
    """``ca_dir``: where the cluster CA lives (made on first start); None: insecure."""
    logs.configure(log_format)
    ca = ClusterCA.load_or_create(ca_dir) if ca_dir else None
    manager_tls = ManagerTls.load_or_create(ca_dir) if ca_dir else None
    tls: dict[str, str] = {}
    if ca is not None and ca_dir is not None:
        # HTTPS under the cluster CA: the CLI and joining hosts check it against the CA.
        served = serving_certificate(ca, ca_dir, socket.gethostname(), [host])
        tls = {
            "ssl_certfile": str(served / "manager-cert.pem"),
            "ssl_keyfile": str(served / "manager-key.pem"),
        }
    uvicorn.run(
        create_app(
            db_url,
            token,
            ca=ca,
            manager_tls=manager_tls,
            manager_addresses=(host,),
            replica=replica,
            lease_s=lease_s,
            exclusive=True,
            address=f"{'https' if tls else 'http'}://{host}:{port}",
        ),
        host=host,
        port=port,
        **tls,  # type: ignore[arg-type]
        **logs.uvicorn_options(access_log),
    )
