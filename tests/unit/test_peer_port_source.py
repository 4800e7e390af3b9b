"""The peer port takes a call about a VM only from the source host the manager named for that
VM's incoming migration (real agent apps; TLS itself is tested in test_pki and the lab)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qmotion.agent.app import AgentState, create_app, create_peer_app
from qmotion.agent.config import AgentConfig

TOKEN = "t" * 32
SOURCE = "198.18.0.11"
STEER = {"mac": ["52:54:00:00:00:01"]}


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[AgentState]:
    config = AgentConfig(
        name="h2", state_dir=tmp_path / "state", token=TOKEN, run_dir=tmp_path / "run"
    )
    config.state_dir.mkdir()
    with TestClient(create_app(config)) as api:
        vm = {"name": "vm1", "memory": "64M"}
        resp = api.post("/v1/vms", json=vm, headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 201, resp.text
        state: AgentState = api.app.state.agent  # type: ignore[attr-defined]
        yield state


def _call(state: AgentState, caller: str) -> int:
    with TestClient(create_peer_app(state), client=(caller, 40000)) as peer:
        status: int = peer.post("/v1/peer/vms/vm1/steer", json=STEER).status_code
        return status


def test_only_the_named_source_gets_past_the_check(destination: AgentState) -> None:
    destination.vms.records.begin_incoming("vm1", "m" * 32, "auto", [SOURCE])
    assert _call(destination, "198.18.0.13") == 403  # another host of the cluster
    # The named source passes the check (and then hears there is nothing to steer yet).
    assert _call(destination, SOURCE) == 409


def test_a_migration_with_no_source_named_takes_any_cluster_host(
    destination: AgentState,
) -> None:
    destination.vms.records.begin_incoming("vm1", "m" * 32, "auto", [])
    assert _call(destination, "198.18.0.13") == 409
