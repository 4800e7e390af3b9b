"""Which manager the CLI talks to: QMOTION_SERVER/QMOTION_TOKEN, or the lab that is up."""

from __future__ import annotations

import os
from pathlib import Path

from qmotion.cli.common import fail
from qmotion.client.server import ServerClient
from qmotion.lab import LabRecord
from qmotion.paths import labs_dir


def server_client(lab: str | None = None) -> ServerClient:
    url = os.environ.get("QMOTION_SERVER")
    token = os.environ.get("QMOTION_TOKEN")
    if url and token:
        return ServerClient(url, token)
    records = []
    root = labs_dir()
    for path in sorted(root.glob("*/lab.json")) if root.is_dir() else []:
        rec = LabRecord.model_validate_json(path.read_text())
        if rec.manager_url and rec.manager_token_file and (lab is None or rec.name == lab):
            records.append(rec)
    if len(records) != 1:
        names = ", ".join(r.name for r in records)
        fail(
            "no manager to talk to: set QMOTION_SERVER and QMOTION_TOKEN, or start a lab "
            "(`qmotion lab up`)"
            if not records
            else f"several labs are up ({names}); pick one with --lab",
            2,
        )
    rec = records[0]
    assert rec.manager_url and rec.manager_token_file
    return ServerClient(rec.manager_url, Path(rec.manager_token_file).read_text().strip())
