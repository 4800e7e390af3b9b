"""The agent's API refuses bad requests clearly and changes nothing (real app, no guests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig, DatastoreConfig

TOKEN = "t" * 32


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[TestClient]:
    store = tmp_path / "store"
    store.mkdir()
    config = AgentConfig(
        name="h9",
        state_dir=tmp_path / "state",
        token=TOKEN,
        run_dir=tmp_path / "run",
        accel="tcg",
        datastores=(DatastoreConfig("shared", store, True),),
    )
    config.state_dir.mkdir()
    with TestClient(create_app(config)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "vm1", "memory": "256M"}
    base.update(over)
    return base


def test_no_token_is_refused(agent: TestClient) -> None:
    resp = agent.get("/v1/vms", headers={"Authorization": ""})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    resp = agent.get("/v1/vms", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401


def test_unknown_field_names_the_field(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(memroy="1G"))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "memroy"
    assert agent.get("/v1/vms").json() == []


def test_memory_not_a_size(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(memory="plenty"))
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["field"] == "memory"
    assert "plenty" in err["message"]


def test_missing_disk_image(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(disks=[{"datastore": "shared", "path": "no.qcow2"}]))
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["field"] == "disks[0].path"
    assert "not found" in err["message"]
    assert agent.get("/v1/vms").json() == []


def test_unknown_datastore(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(disks=[{"datastore": "nfs9", "path": "a.qcow2"}]))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "disks[0].datastore"


def test_missing_bridge(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(nics=[{"mac": "52:54:00:00:00:09", "bridge": "nobr0"}]))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "nics[0].bridge"


def test_unsupported_cpu_model_and_machine(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(cpu_model="Pentium9000"))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "cpu_model"
    resp = agent.post("/v1/vms", json=spec(machine="pc-i440fx-0.1"))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "machine"


def test_missing_kernel_image(agent: TestClient) -> None:
    resp = agent.post("/v1/vms", json=spec(boot={"kind": "kernel", "kernel": "/nope/vmlinuz"}))
    assert resp.status_code == 422
    assert resp.json()["error"]["field"] == "boot.kernel"


def test_unknown_vm(agent: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/vms/ghost"),
        ("POST", "/v1/vms/ghost/start"),
        ("POST", "/v1/vms/ghost/stop"),
        ("DELETE", "/v1/vms/ghost"),
    ]:
        resp = agent.request(method, path)
        assert resp.status_code == 404, path
        assert resp.json()["error"] == {
            "code": "vm_not_found",
            "message": "no VM named 'ghost' on this host",
            "vm": "ghost",
            "host": "h9",
            "field": None,
            "qmp_class": None,
        }


def test_define_twice_conflicts_and_stop_of_stopped_vm(agent: TestClient) -> None:
    assert agent.post("/v1/vms", json=spec()).status_code == 201
    resp = agent.post("/v1/vms", json=spec())
    assert resp.status_code == 409
    assert resp.json()["error"]["field"] == "name"
    resp = agent.post("/v1/vms/vm1/stop")
    assert resp.status_code == 409
    assert agent.get("/v1/vms/vm1").json()["state"] == "stopped"


def test_definition_survives_agent_restart(tmp_path: Path) -> None:
    config = AgentConfig(
        name="h9", state_dir=tmp_path / "s", token=TOKEN, run_dir=tmp_path / "r", accel="tcg"
    )
    config.state_dir.mkdir()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(config)) as c:
        assert c.post("/v1/vms", json=spec(), headers=headers).status_code == 201
    with TestClient(create_app(config)) as c:
        names = [v["name"] for v in c.get("/v1/vms", headers=headers).json()]
    assert names == ["vm1"]


def test_openapi_published(agent: TestClient) -> None:
    paths = agent.get("/openapi.json").json()["paths"]
    assert "/v1/vms/{name}/start" in paths


def test_migration_calls_name_their_migration_and_refuse_one_not_here(
    agent: TestClient,
) -> None:
    """A VM defined here that did not arrive by migration M: its teardown as M's failed
    destination and M's word are refused, nothing touched; a malformed id is a 422."""
    m = "c" * 32
    assert agent.post("/v1/vms", json=spec()).status_code == 201
    info = agent.get("/v1/vms/vm1").json()
    assert [info[k] for k in ("incoming_migration", "outgoing_migration", "outgoing_status")] == [
        None,
        None,
        None,
    ]
    resp = agent.delete("/v1/vms/vm1", params={"migration": m, "force": "true"})
    assert resp.status_code == 409
    assert f"not the destination of migration {m}" in resp.json()["error"]["message"]
    resp = agent.post("/v1/vms/vm1/migration/finish", params={"migration": m})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "conflict")
    assert agent.post("/v1/vms/ghost/migration/finish", params={"migration": m}).status_code == 404
    for method, path in [
        ("POST", "/v1/vms/vm1/migration/finish"),
        ("DELETE", "/v1/vms/vm1"),
        ("GET", "/v1/vms/vm1/migration"),
        ("POST", "/v1/vms/vm1/resume"),
    ]:
        resp = agent.request(method, path, params={"migration": "not-an-id"})
        assert resp.status_code == 422, path
    assert [v["name"] for v in agent.get("/v1/vms").json()] == ["vm1"]


def test_the_word_is_served_on_the_peer_port_too(agent: TestClient) -> None:
    state = agent.app.state.agent  # type: ignore[attr-defined]
    paths = state.peer.app.openapi()["paths"]
    assert "/v1/peer/vms/{name}/migration/finish" in paths
    assert "/v1/vms/{name}/migration/finish" in agent.get("/openapi.json").json()["paths"]


def test_an_agent_may_keep_its_token_as_a_hash(tmp_path: Path) -> None:
    """The agent only compares its token: its file may hold the SHA-256, not the secret."""
    import hashlib

    config = AgentConfig(
        name="h9",
        state_dir=tmp_path / "state",
        token="sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest(),
        run_dir=tmp_path / "run",
    )
    config.state_dir.mkdir()
    with TestClient(create_app(config)) as client:
        assert client.get("/v1/vms", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
        wrong = {"Authorization": f"Bearer {config.token}"}  # the hash itself is no token
        assert client.get("/v1/vms", headers=wrong).status_code == 401
