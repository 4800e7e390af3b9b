"""``qmotion user`` and ``qmotion audit`` end to end: the CLI, the typed client and the real
manager app (in-process, real SQLite), as an admin sets up a colleague."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from qmotion.api.access import Role
from qmotion.api.server import MigrateRequest
from qmotion.cli import audit, cluster, host, user
from qmotion.cli.main import app as cli
from qmotion.client.errors import ApiError
from qmotion.client.server import ServerClient
from qmotion.pki import ClusterCA
from qmotion.server.db import Database
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

ROOT_TOKEN = "service-token-0123456789abcdef"
runner = CliRunner()


def _manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ca: ClusterCA | None) -> Any:
    url = f"sqlite:///{tmp_path / 'manager.db'}"
    db = Database(url)
    world = World()
    world.register_hosts(db)
    world.add_running_vm(db, "web", "h1")
    db.engine.dispose()
    tc = TestClient(create_app(url, ROOT_TOKEN, agents=world.connector(), ca=ca))
    for module in (user, audit, host, cluster):
        monkeypatch.setattr(module, "server_client", lambda lab=None: _client(tc, ROOT_TOKEN))
    return tc


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with _manager(tmp_path, monkeypatch, None) as tc:
        yield tc


@pytest.fixture
def secure_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """With a cluster CA: hosts may join."""
    with _manager(tmp_path, monkeypatch, ClusterCA.load_or_create(tmp_path / "ca")) as tc:
        yield tc


def _client(tc: TestClient, token: str) -> ServerClient:
    return ServerClient("http://testserver", token, transport=tc._transport)


def _run(args: list[str]) -> str:
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_an_admin_adds_an_operator_who_migrates_and_the_audit_shows_it(
    manager: TestClient,
) -> None:
    assert "user otto added as operator" in _run(["user", "add", "otto", "--role", "operator"])
    token = _run(["user", "token", "create", "otto", "--label", "laptop"]).splitlines()[-1]
    with _client(manager, token) as otto:
        assert otto.whoami().role == "operator"
        task = otto.migrate("web", MigrateRequest(to="h2"))
        with pytest.raises(ApiError) as refused:
            otto.add_user("mallory", Role.ADMIN)
        assert refused.value.status == 403
    users = json.loads(_run(["user", "list", "--json"]))
    assert [(u["name"], u["role"], u["tokens"]) for u in users] == [("otto", "operator", 1)]
    rows = json.loads(_run(["audit", "list", "--user", "otto", "--json"]))
    assert [(r["method"], r["path"], r["status"]) for r in rows] == [
        ("POST", "/v1/users", 403),
        ("POST", "/v1/vms/web/migrate", 202),
    ]
    assert rows[1]["task_id"] == task.id
    table = _run(["audit", "list", "--limit", "2"])
    assert "otto (operator)" in table and "more: --after" in table

    tokens = json.loads(_run(["user", "token", "list", "otto", "--json"]))
    assert [t["label"] for t in tokens] == ["laptop"]
    assert tokens[0]["last_used_at"] is not None
    _run(["user", "token", "revoke", str(tokens[0]["id"])])
    with _client(manager, token) as otto, pytest.raises(ApiError) as gone:
        otto.whoami()
    assert gone.value.status == 401
    assert json.loads(_run(["user", "remove", "otto", "--json"])) == {"deleted": "otto"}
    assert json.loads(_run(["user", "list", "--json"])) == []


def test_a_bad_role_is_refused_by_the_cli_naming_it(manager: TestClient) -> None:
    res = runner.invoke(cli, ["user", "add", "otto", "--role", "god"])
    assert res.exit_code == 2
    assert "god" in res.output


def test_an_admin_adds_a_host_sets_the_pool_and_removes_a_host(
    secure_manager: TestClient,
) -> None:
    out = _run(["host", "add", "h9", "--address", "198.18.0.19"]).splitlines()
    assert out[-1].startswith("qmotion agent join http://testserver --name h9 --token qmj_")
    assert " --ca-hash sha256:" in out[-1]
    added = json.loads(_run(["host", "add", "h8", "--address", "198.18.0.18", "--json"]))
    assert added["host"] == "h8" and added["token"].startswith("qmj_")
    bad = runner.invoke(cli, ["host", "add", "h7", "--address", "not-an-address"])
    assert bad.exit_code == 2 and "--address" in bad.output
    pool = json.loads(_run(["cluster", "pool", "198.18.0.100", "198.18.0.120", "--json"]))
    assert pool == {"first": "198.18.0.100", "last": "198.18.0.120", "prefixlen": 24}
    assert json.loads(_run(["host", "remove", "h2", "--json"])) == {"deleted": "h2"}
    busy = runner.invoke(cli, ["host", "remove", "h1"])
    assert busy.exit_code != 0 and "web" in busy.output


def test_host_list_warns_of_a_certificate_that_ends_soon() -> None:
    from datetime import UTC, datetime, timedelta

    from qmotion.api.host import AccelInfo, HostFacts
    from qmotion.api.server import HostOut

    now = datetime.now(UTC)

    def out(days: float) -> HostOut:
        facts = HostFacts(
            name="h1", cpu_model="x", cpu_flags=[], cpus=1, memory_bytes=1 << 30,
            qemu_version="10.0.2", machine_types=[], machine_aliases={}, cpu_models=[],
            accel=AccelInfo(name="tcg", reason="t"), bridges=[], datastores=[],
            agent_version="0.1.0", cert_not_after=now + timedelta(days=days),
        )  # fmt: skip
        return HostOut(
            name="h1", agent_url="https://198.18.0.11:8100", state="up", last_seen=now,
            vms=[], memory_mib=1024, committed_mib=0, facts=facts,
        )  # fmt: skip

    assert host._notes(out(400), now) == []
    assert host._notes(out(10), now) == [
        f"certificate ends {now + timedelta(days=10):%Y-%m-%d}: qmotion cluster rotate-certs"
    ]
    assert "certificate ENDED" in host._notes(out(-1), now)[0]
