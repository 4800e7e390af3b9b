"""``qmotion user`` and ``qmotion audit`` end to end: the CLI, the typed client and the real
manager app (in-process, real SQLite), as an admin sets up a colleague."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from qmotion.api.access import Role
from qmotion.api.server import MigrateRequest
from qmotion.cli import audit, user
from qmotion.cli.main import app as cli
from qmotion.client.errors import ApiError
from qmotion.client.server import ServerClient
from qmotion.server.db import Database
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

ROOT_TOKEN = "service-token-0123456789abcdef"
runner = CliRunner()


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'manager.db'}"
    db = Database(url)
    world = World()
    world.register_hosts(db)
    world.add_running_vm(db, "web", "h1")
    db.engine.dispose()
    with TestClient(create_app(url, ROOT_TOKEN, agents=world.connector())) as tc:
        for module in (user, audit):
            monkeypatch.setattr(module, "server_client", lambda lab=None: _client(tc, ROOT_TOKEN))
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
