"""Which manager the CLI talks to: the environment, the CLI's config file, or the lab that is up.

``QMOTION_SERVER`` and ``QMOTION_TOKEN`` (and ``QMOTION_CA``, the cluster CA an https manager
is checked against) win; then ``~/.config/qmotion/cli.toml`` (keys ``server``,
``token-file``, ``ca-file``); then the one lab that is up. The server may be several URLs
(the manager's replicas: commas in ``QMOTION_SERVER``, a list in the file), tried in turn.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from qmotion.cli.common import fail
from qmotion.client.server import ServerClient
from qmotion.lab import LabRecord
from qmotion.paths import labs_dir

CLI_KEYS = ("server", "token-file", "ca-file")


def cli_config_path() -> Path:
    return Path(os.environ.get("QMOTION_CLI_CONFIG", "~/.config/qmotion/cli.toml")).expanduser()


def _from_config(path: Path) -> ServerClient | None:
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: {exc}", 2)
    data = {k.replace("_", "-"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(CLI_KEYS))
    server = data.get("server")
    if isinstance(server, list) and server and all(isinstance(u, str) for u in server):
        server = ",".join(server)  # the manager's replicas, tried in turn
    if unknown or not isinstance(server, str):
        fail(
            f'{path}: needs server = "https://..." or a list of them (keys: {", ".join(CLI_KEYS)})',
            2,
        )
    try:
        token = Path(str(data.get("token-file", ""))).expanduser().read_text().strip()
    except OSError as exc:
        fail(f"{path}: token-file: {exc}", 2)
    ca = data.get("ca-file")
    return ServerClient(server, token, ca_file=str(Path(str(ca)).expanduser()) if ca else None)


def server_client(lab: str | None = None) -> ServerClient:
    url = os.environ.get("QMOTION_SERVER")
    token = os.environ.get("QMOTION_TOKEN")
    if url and token:
        return ServerClient(url, token, ca_file=os.environ.get("QMOTION_CA") or None)
    if lab is None and (configured := _from_config(cli_config_path())) is not None:
        return configured
    records = []
    root = labs_dir()
    for path in sorted(root.glob("*/lab.json")) if root.is_dir() else []:
        rec = LabRecord.model_validate_json(path.read_text())
        if rec.manager_url and rec.manager_token_file and (lab is None or rec.name == lab):
            records.append(rec)
    if len(records) != 1:
        names = ", ".join(r.name for r in records)
        fail(
            "no manager to talk to: set QMOTION_SERVER and QMOTION_TOKEN (and QMOTION_CA), "
            f"write {cli_config_path()}, or start a lab (`qmotion lab up`)"
            if not records
            else f"several labs are up ({names}); pick one with --lab",
            2,
        )
    rec = records[0]
    assert rec.manager_url and rec.manager_token_file
    return ServerClient(
        # Its replicas too: the CLI goes on through another when one is down.
        ",".join([rec.manager_url, *(r.url for r in rec.replicas)]),
        Path(rec.manager_token_file).read_text().strip(),
        ca_file=rec.manager_ca_file,
    )
