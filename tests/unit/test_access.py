"""Roles on every route of the manager, hashed tokens, and an audit row per state-changing call
(the real manager app on a real SQLite file, scripted agents)."""

from __future__ import annotations

import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qmotion.server.db import Database
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

ROOT_TOKEN = "service-token-0123456789abcdef"
# The only POST a viewer may make: it computes a placement and changes nothing.
VIEWER_POSTS = {("POST", "/v1/drs/place")}
# The only routes without a bearer token: health, and a joining host's (its one-time join
# token is in the body; the CA is public).
PUBLIC = {("GET", "/healthz"), ("GET", "/v1/join/ca"), ("POST", "/v1/join")}
PATH_VALUES = {"name": "web", "task_id": "1", "schedule_id": "1", "token_id": "1"}


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    db_file = tmp_path / "state" / "manager.db"
    url = f"sqlite:///{db_file}"
    db = Database(url)
    world = World()
    world.register_hosts(db)
    world.add_running_vm(db, "web", "h1")
    db.engine.dispose()
    with TestClient(create_app(url, ROOT_TOKEN, agents=world.connector())) as client:
        yield client, db_file


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(client: TestClient, user: str, role: str) -> str:
    root = _as(ROOT_TOKEN)
    assert client.post("/v1/users", json={"name": user, "role": role}, headers=root).is_success
    resp = client.post(f"/v1/users/{user}/tokens", json={"label": "test"}, headers=root)
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def _operations(client: TestClient) -> list[tuple[str, str, str]]:
    """(method, template, a concrete path) of every operation the manager publishes that
    asks for a bearer token; the ones that do not must be exactly PUBLIC."""
    out: list[tuple[str, str, str]] = []
    public = set()
    for template, item in client.get("/openapi.json").json()["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], template)
        for method, op in item.items():
            if op.get("security"):
                out.append((method.upper(), template, concrete))
            else:
                public.add((method.upper(), template))
    assert public == PUBLIC
    return out


def _state(client: TestClient) -> Any:
    root = _as(ROOT_TOKEN)
    return [
        client.get(p, headers=root).json()
        for p in ("/v1/vms", "/v1/hosts", "/v1/tasks", "/v1/rules", "/v1/schedules", "/v1/users")
    ]


def test_a_viewer_is_refused_every_state_changing_route_and_nothing_changes(
    manager: tuple[TestClient, Path],
) -> None:
    client, _ = manager
    viewer = _token(client, "vera", "viewer")
    before = _state(client)
    changing = [op for op in _operations(client) if op[0] != "GET"]
    assert len(changing) >= 25  # the walk found the routes (not an empty loop)
    for method, template, path in changing:
        resp = client.request(method, path, json={}, headers=_as(viewer))
        if (method, template) in VIEWER_POSTS:
            assert resp.status_code != 403, (method, template)
            continue
        assert resp.status_code == 403, (method, template, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "forbidden"
        assert "vera is viewer" in err["message"]
    assert _state(client) == before
    # ... and may read everything but users, tokens and the audit log.
    for method, template, path in _operations(client):
        if method == "GET":
            resp = client.get(path, headers=_as(viewer))
            admin_only = template.startswith(("/v1/users", "/v1/audit"))
            assert (resp.status_code == 403) == admin_only, (template, resp.status_code)


def test_an_operator_moves_vms_but_cannot_add_hosts_users_or_change_settings(
    manager: tuple[TestClient, Path],
) -> None:
    client, _ = manager
    op = _as(_token(client, "otto", "operator"))
    refused = [
        ("POST", "/v1/hosts", {"name": "h9", "agent_url": "http://h9:7100", "token": "t" * 32}),
        ("POST", "/v1/users", {"name": "mallory", "role": "admin"}),
        ("POST", "/v1/users/otto/tokens", {}),
        ("PUT", "/v1/pool", {"first": "198.18.0.10", "last": "198.18.0.20", "prefixlen": 24}),
        ("PUT", "/v1/cluster/settings", {}),
        ("POST", "/v1/hosts/join-tokens", {"name": "h9", "address": "198.18.0.19"}),
        ("DELETE", "/v1/hosts/h2", None),
        ("POST", "/v1/cluster/rotate-certs", None),
        ("GET", "/v1/users", None),
        ("GET", "/v1/audit", None),
    ]
    for method, path, body in refused:
        resp = client.request(method, path, json=body, headers=op)
        assert resp.status_code == 403, (method, path, resp.text)
    assert [u["name"] for u in client.get("/v1/users", headers=_as(ROOT_TOKEN)).json()] == ["otto"]
    assert len(client.get("/v1/hosts", headers=op).json()) == 2
    moved = client.post("/v1/vms/web/migrate", json={"to": "h2"}, headers=op)
    assert moved.status_code == 202, moved.text
    assert client.get("/v1/whoami", headers=op).json() == {"user": "otto", "role": "operator"}


def test_the_audit_log_has_a_row_per_call_of_a_session(manager: tuple[TestClient, Path]) -> None:
    client, _ = manager
    op = _token(client, "otto", "operator")
    viewer = _token(client, "vera", "viewer")
    session = [
        (op, "POST", "/v1/vms/web/migrate", {"to": "h2"}, 202),
        (op, "POST", "/v1/vms/ghost/stop", {}, 404),
        (op, "POST", "/v1/rules", {"name": "r1", "kind": "bogus"}, 422),
        (viewer, "DELETE", "/v1/vms/web", None, 403),
        ("qmu_not-a-token", "POST", "/v1/vms/web/start", None, 401),
        (viewer, "GET", "/v1/vms", None, 200),  # a read: not audited
    ]
    for token, method, path, body, status in session:
        resp = client.request(method, path, json=body, headers=_as(token))
        assert resp.status_code == status, (path, resp.text)
    rows = client.get("/v1/audit", params={"limit": 5}, headers=_as(ROOT_TOKEN)).json()
    got = [(r["user"], r["method"], r["path"], r["status"], r["outcome"]) for r in rows]
    assert got == [
        (None, "POST", "/v1/vms/web/start", 401, "denied"),
        ("vera", "DELETE", "/v1/vms/web", 403, "denied"),
        ("otto", "POST", "/v1/rules", 422, "refused"),
        ("otto", "POST", "/v1/vms/ghost/stop", 404, "refused"),
        ("otto", "POST", "/v1/vms/web/migrate", 202, "ok"),
    ]
    migrate = rows[-1]
    assert migrate["route"] == "/v1/vms/{name}/migrate"
    assert migrate["role"] == "operator"
    assert client.get(f"/v1/tasks/{migrate['task_id']}", headers=_as(op)).json()["vm"] == "web"
    # The setup's four calls (two users, two tokens) are there too, by root.
    everything = client.get("/v1/audit", headers=_as(ROOT_TOKEN)).json()
    assert [r["user"] for r in everything[len(session) - 1 :]] == ["root"] * 4


def test_audit_pages_lose_and_repeat_nothing(manager: tuple[TestClient, Path]) -> None:
    client, _ = manager
    root = _as(ROOT_TOKEN)
    for i in range(7):
        client.post(f"/v1/vms/ghost{i}/stop", json={}, headers=root)
    seen: list[int] = []
    after: str | None = None
    while True:
        params = {"limit": 3} | ({"after": after} if after else {})
        resp = client.get("/v1/audit", params=params, headers=root)
        seen += [r["id"] for r in resp.json()]
        after = resp.headers.get("X-Next-After")
        if after is None:
            break
    assert len(seen) == 7 and seen == sorted(set(seen), reverse=True)
    bad = client.get("/v1/audit", params={"limit": 0}, headers=root)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "limit"


def test_tokens_are_kept_hashed_and_a_revoked_one_stops_at_once(
    manager: tuple[TestClient, Path],
) -> None:
    client, db_file = manager
    token = _token(client, "otto", "operator")
    assert client.get("/v1/vms", headers=_as(token)).status_code == 200
    with sqlite3.connect(db_file) as conn:
        dump = "\n".join(conn.iterdump())
    assert token not in dump and token[4:] not in dump
    tokens = client.get("/v1/users/otto/tokens", headers=_as(ROOT_TOKEN)).json()
    assert [t["prefix"] for t in tokens] == [token[:12]]
    revoked = client.delete(f"/v1/tokens/{tokens[0]['id']}", headers=_as(ROOT_TOKEN))
    assert revoked.json()["revoked_at"] is not None
    assert client.get("/v1/vms", headers=_as(token)).status_code == 401
    # Removing a user ends their other tokens too.
    second = _token_for_existing(client, "otto")
    assert client.delete("/v1/users/otto", headers=_as(ROOT_TOKEN)).status_code == 204
    assert client.get("/v1/vms", headers=_as(second)).status_code == 401


def _token_for_existing(client: TestClient, user: str) -> str:
    resp = client.post(f"/v1/users/{user}/tokens", json={}, headers=_as(ROOT_TOKEN))
    token: str = resp.json()["token"]
    assert client.get("/v1/vms", headers=_as(token)).status_code == 200
    return token


def test_the_database_is_private_to_its_owner(manager: tuple[TestClient, Path]) -> None:
    _, db_file = manager
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_file.parent.stat().st_mode) == 0o700
    for extra in (db_file.with_name(db_file.name + "-wal"),):
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) == 0o600


def test_bad_user_input_names_the_field(manager: tuple[TestClient, Path]) -> None:
    client, _ = manager
    root = _as(ROOT_TOKEN)
    resp = client.post("/v1/users", json={"name": "otto", "role": "god"}, headers=root)
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "role"
    resp = client.post("/v1/users", json={"name": "root", "role": "admin"}, headers=root)
    assert resp.status_code == 409 and resp.json()["error"]["field"] == "name"
    _token(client, "otto", "viewer")
    resp = client.post("/v1/users", json={"name": "otto", "role": "admin"}, headers=root)
    assert resp.status_code == 409
    assert client.get("/v1/users", headers=root).json()[0]["role"] == "viewer"
