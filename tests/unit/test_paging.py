"""Paging of ``GET /v1/tasks`` and ``GET /v1/vms``, through the API, the client and the CLI.

The manager's real app on a real database.

Pages follow a cursor (a task's id, a VM's name): walked to the end they hold every row once,
in the list's order, also when rows come and go between two pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from qmotion.cli import task as task_cli
from qmotion.cli import vm as vm_cli
from qmotion.cli.main import app as cli_app
from qmotion.client import ServerClient
from qmotion.server.db import Database, Task, Vm
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

TOKEN = "paging-token-0123456789"
TASKS = 105  # more than the default page
VMS = 7


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=("h1", "h2"))
    world.register_hosts(db)
    for i in range(VMS):
        world.add_running_vm(db, f"vm{i:02d}", "h1")
    with db.session() as s:
        s.add_all(
            Task(kind="migrate", state="succeeded", vm=f"vm{i % VMS:02d}", source="h1")
            for i in range(TASKS)
        )
    db.engine.dispose()
    return url


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    # Routes only (no lifespan): nothing but the test touches the database.
    c = TestClient(create_app(db_url, TOKEN, agents=World(hosts=("h1", "h2")).connector()))
    c.headers["Authorization"] = f"Bearer {TOKEN}"
    yield c
    c.close()


def walk(api: TestClient, path: str, limit: int) -> tuple[list[list[object]], list[str]]:
    """Every page of ``path`` (the keys of its rows) and the cursors that led to them."""
    pages: list[list[object]] = []
    cursors: list[str] = []
    params: dict[str, object] = {"limit": limit}
    while True:
        r = api.get(path, params=params)
        assert r.status_code == 200, r.text
        pages.append([row["id"] if "id" in row else row["name"] for row in r.json()])
        after = r.headers.get("X-Next-After")
        if after is None:
            return pages, cursors
        cursors.append(after)
        params = {"limit": limit, "after": after}


def test_task_pages_hold_every_task_once_newest_first(api: TestClient) -> None:
    everything = api.get("/v1/tasks", params={"limit": 1000})
    assert "X-Next-After" not in everything.headers
    ids = [t["id"] for t in everything.json()]
    assert len(ids) == TASKS and ids == sorted(ids, reverse=True)

    pages, cursors = walk(api, "/v1/tasks", 10)
    assert [len(p) for p in pages] == [10] * 10 + [5]
    assert [x for p in pages for x in p] == ids
    # The cursor is the last id of the page it ends.
    assert cursors == [str(p[-1]) for p in pages[:-1]]

    # The default page is 100, and says where the rest begins.
    r = api.get("/v1/tasks")
    assert [t["id"] for t in r.json()] == ids[:100]
    assert r.headers["X-Next-After"] == str(ids[99])
    rest = api.get("/v1/tasks", params={"after": r.headers["X-Next-After"]})
    assert [t["id"] for t in rest.json()] == ids[100:] and "X-Next-After" not in rest.headers


def test_rows_coming_and_going_between_pages_move_no_other_row(
    api: TestClient, db_url: str
) -> None:
    first = api.get("/v1/vms", params={"limit": 3})
    assert [v["name"] for v in first.json()] == ["vm00", "vm01", "vm02"]
    assert first.headers["X-Next-After"] == "vm02"
    tasks = api.get("/v1/tasks", params={"limit": 3})
    newest = [t["id"] for t in tasks.json()]

    db = Database(db_url)
    with db.session() as s:  # the cursor's own VM goes, a VM that sorts first comes
        s.delete(s.query(Vm).filter_by(name="vm02").one())
        s.add(Task(kind="migrate", state="queued", vm="vm06", source="h1"))
    db.engine.dispose()

    second = api.get("/v1/vms", params={"limit": 3, "after": "vm02"})
    assert [v["name"] for v in second.json()] == ["vm03", "vm04", "vm05"]
    older = api.get("/v1/tasks", params={"limit": 3, "after": tasks.headers["X-Next-After"]})
    assert [t["id"] for t in older.json()] == [newest[-1] - 1, newest[-1] - 2, newest[-1] - 3]


def test_vms_are_all_listed_unless_a_limit_is_given(api: TestClient) -> None:
    r = api.get("/v1/vms")
    assert [v["name"] for v in r.json()] == [f"vm{i:02d}" for i in range(VMS)]
    assert "X-Next-After" not in r.headers
    pages, _ = walk(api, "/v1/vms", 2)
    assert pages == [["vm00", "vm01"], ["vm02", "vm03"], ["vm04", "vm05"], ["vm06"]]
    # A limit that ends exactly at the last VM: no next page.
    r = api.get("/v1/vms", params={"limit": VMS})
    assert len(r.json()) == VMS and "X-Next-After" not in r.headers


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/tasks", {"limit": 0}, "limit"),
        ("/v1/tasks", {"limit": 1001}, "limit"),
        ("/v1/tasks", {"limit": "ten"}, "limit"),
        ("/v1/tasks", {"after": 0}, "after"),
        ("/v1/tasks", {"after": "vm01"}, "after"),
        ("/v1/vms", {"limit": 0}, "limit"),
        ("/v1/vms", {"limit": 5000}, "limit"),
        ("/v1/vms", {"after": ""}, "after"),
    ],
)
def test_a_bad_limit_or_cursor_is_refused_naming_it(
    api: TestClient, path: str, params: dict[str, object], field: str
) -> None:
    r = api.get(path, params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_the_list_routes_document_their_paging(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    for path in ("/v1/tasks", "/v1/vms"):
        op = spec["paths"][path]["get"]
        assert {p["name"] for p in op["parameters"]} == {"limit", "after"}
        assert "X-Next-After" in op["responses"]["200"]["headers"]


def client_over(api: TestClient) -> ServerClient:
    def forward(request: httpx.Request) -> httpx.Response:
        r = api.request(
            request.method,
            request.url.path,
            params=request.url.params,
            content=request.content,
            headers=request.headers,
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return ServerClient("http://manager", TOKEN, transport=httpx.MockTransport(forward))


def test_the_client_reads_the_next_cursor(api: TestClient) -> None:
    with client_over(api) as client:
        page = client.task_page(limit=60)
        assert len(page.items) == 60 and page.next_after == str(page.items[-1].id)
        rest = client.task_page(limit=60, after=int(page.next_after))
        assert len(rest.items) == TASKS - 60 and rest.next_after is None
        assert len({t.id for t in page.items + rest.items}) == TASKS
        assert len(client.tasks()) == 100  # the manager's default page
        assert [v.name for v in client.vms(limit=2, after="vm04")] == ["vm05", "vm06"]
        assert client.vm_page(limit=2, after="vm04").next_after is None
        assert len(client.vms()) == VMS


def test_cli_lists_a_page_and_says_how_to_get_the_next(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (task_cli, vm_cli):
        monkeypatch.setattr(module, "server_client", lambda lab=None: client_over(api))
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    res = runner.invoke(cli_app, ["vm", "list", "--limit", "3"], env=env)
    assert res.exit_code == 0, res.output
    assert "vm02" in res.stdout and "vm03" not in res.stdout
    assert res.stdout.rstrip().endswith("more: --after vm02")
    res = runner.invoke(cli_app, ["vm", "list", "--limit", "3", "--after", "vm05"], env=env)
    assert res.exit_code == 0 and "vm06" in res.stdout and "more:" not in res.stdout

    res = runner.invoke(cli_app, ["task", "list", "--limit", "2", "--json"], env=env)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)  # the list alone, as before paging
    assert isinstance(got, list) and [t["id"] for t in got] == [TASKS, TASKS - 1]
    res = runner.invoke(cli_app, ["task", "list", "--limit", "2"], env=env)
    assert res.stdout.rstrip().endswith(f"more: --after {TASKS - 1}")
    res = runner.invoke(cli_app, ["task", "list", "--limit", "2000"], env=env)
    assert res.exit_code == 2 and "limit" in res.stderr, res.output
