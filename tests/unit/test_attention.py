"""A VM's attention mark and `vm delete --force`, over the real manager and scripted agents.

Issue 22: `vm delete --force` of a VM paused in postmigrate on its recorded host while it runs
on another killed the paused copy and forgot the VM (the other hosts were asked only when the
recorded host said "not found"). Now every host that is not down is asked first, and a VM that
needs attention is neither deleted with --force, nor migrated (live, storage, cold), nor moved by
DRS or a maintenance evacuation; the mark is in the API, `vm list` and `vm show`, and a
database made before it gets the column at start.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from qmotion.api.server import VmOut
from qmotion.api.vm import Nic, VmSpec
from qmotion.cli import vm as vm_cli
from qmotion.cli.main import app as cli_app
from qmotion.client.paging import Page
from qmotion.server.db import Database, Host, Vm
from qmotion.server.inventory import Inventory
from tests.unit.agent_world import FakeVm, World
from tests.unit.manager_app import Client
from tests.unit.manager_app import run_manager as _manager
from tests.unit.manager_app import wait_task as _wait

GIB = 1 << 30
REASON = "runs on h1 and h2: two copies"


def _cluster(tmp_path: Path, vms: dict[str, list[str]]) -> tuple[World, str]:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=("h1", "h2", "h3"), polls_to_complete=2)
    for h in world.hosts:
        world.facts_override[h] = {"cpus": 4, "memory_bytes": 8 * GIB}
    world.register_hosts(db)
    for host, names in vms.items():
        for name in names:
            world.add_running_vm(db, name, host)
    db.engine.dispose()
    return world, url


def _twin(world: World, vm: str, host: str, runstate: str) -> None:
    """A second copy of ``vm`` on ``host`` (its definition as the first copy's)."""
    first = next(h[vm] for h in world.vms.values() if vm in h)
    world.vms[host][vm] = FakeVm(spec=first.spec, runstate=runstate)


def _mark(url: str, vm: str, reason: str | None = REASON) -> None:
    db = Database(url)
    Inventory(db).set_attention(vm, reason)
    db.engine.dispose()


# ---------------------------------------------------------------------- delete --force


def test_force_delete_never_forgets_a_vm_another_host_reports(tmp_path: Path) -> None:
    """Issue 22, finding 2: paused in postmigrate on h1 (the inventory's host), running on
    h2. The old code killed h1's copy and forgot the VM, which still ran on h2."""
    world, url = _cluster(tmp_path, {"h1": ["vm0", "vm1"]})
    world.vms["h1"]["vm0"].runstate = "postmigrate"
    _twin(world, "vm0", "h2", "running")
    # vm1's only other copy is a stopped definition on h3: any run state counts.
    _twin(world, "vm1", "h3", "gone")

    async def test(c: Client) -> None:
        for vm, host in (("vm0", "h2"), ("vm1", "h3")):
            for force in ("true", "false"):
                r = await c.delete(f"/v1/vms/{vm}", params={"force": force})
                assert r.status_code == 409, r.text
                error = r.json()["error"]
                assert error["host"] == host and error["vm"] == vm, error
                assert host in error["message"]
        names = [v["name"] for v in (await c.get("/v1/vms")).json()]
        assert sorted(names) == ["vm0", "vm1"]

    _manager(world, url, test)
    # Nothing was touched on any host.
    assert world.vms["h1"]["vm0"].runstate == "postmigrate"
    assert world.running_copies("vm0") == ["h2"]
    assert world.running_copies("vm1") == ["h1"] and "vm1" in world.vms["h3"]


def test_force_delete_refuses_a_marked_vm_and_asks_every_host_not_down(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path, {"h1": ["vm0", "vm1", "vm2"]})
    _mark(url, "vm0")
    del world.vms["h1"]["vm2"]  # removed there by hand

    async def test(c: Client) -> None:
        r = await c.delete("/v1/vms/vm0", params={"force": "true"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "vm_attention", r.text
        assert REASON in r.json()["error"]["message"]
        # A host that is up but does not answer might hold it: refused, nothing deleted.
        world.unreachable.add("h3")
        r = await c.delete("/v1/vms/vm1", params={"force": "true"})
        assert r.status_code == 502 and r.json()["error"]["host"] == "h3", r.text
        # A host that is down is not asked: the VM its host no longer has is forgotten.
        db = Database(url)
        with db.session() as s:
            s.query(Host).filter_by(name="h3").one().state = "down"
        db.engine.dispose()
        r = await c.delete("/v1/vms/vm2", params={"force": "true"})
        assert r.status_code == 204, r.text
        r = await c.delete("/v1/vms/vm1", params={"force": "true"})
        assert r.status_code == 204, r.text

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h1"]
    assert "vm1" not in world.vms["h1"]


# ---------------------------------------------------------------------- the mark


def test_a_database_made_before_attention_gets_the_column(tmp_path: Path) -> None:
    """The vms table as the manager made it before issue 22 (no attention column): the
    manager starts on it, keeps its VMs and marks them."""
    path = tmp_path / "old.db"
    spec = VmSpec(name="vm0", memory="256M", nics=[Nic(mac="52:54:00:00:00:01")])
    con = sqlite3.connect(path)
    con.executescript(OLD_SCHEMA)
    con.execute(
        "INSERT INTO hosts VALUES (1, 'h1', 'http://h1:7100', 'tok', 'up', NULL, "
        "'2026-01-01 00:00:00.000000', NULL)"
    )
    con.execute(
        "INSERT INTO vms VALUES (1, 'vm0', ?, '52:54:00:00:00:01', NULL, 1, 'running', ?, 256, "
        "'2026-01-01 00:00:00.000000')",
        (str(spec.uuid), json.dumps(spec.model_dump(mode="json"))),
    )
    con.commit()
    con.close()
    for _ in range(2):  # a second start finds the column there
        db = Database(f"sqlite:///{path}")
        inventory = Inventory(db)
        (vm,) = inventory.list_vms()
        assert vm.name == "vm0" and vm.host == "h1" and vm.attention is None
        inventory.set_attention("vm0", REASON)
        assert inventory.list_vms()[0].attention == REASON
        inventory.set_attention("vm0", None)
        assert inventory.list_vms()[0].attention is None
        db.engine.dispose()


class _Manager:
    """The two calls `vm list` and `vm show` make, answered by the real inventory (all of its
    VMs on one page, as the manager lists them unless given a limit)."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    def __enter__(self) -> _Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def vm_page(self, *, limit: int | None = None, after: str | None = None) -> Page[VmOut]:
        return Page(self.inventory.list_vms(limit, after), None)

    def vm(self, name: str) -> VmOut:
        return self.inventory.show_vm(name, refresh=False)


def test_the_mark_in_the_api_vm_list_and_vm_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, url = _cluster(tmp_path, {"h1": ["vm0", "vm1"]})
    _mark(url, "vm0")

    async def test(c: Client) -> None:
        assert (await c.get("/v1/vms/vm0")).json()["attention"] == REASON
        marks = {v["name"]: v["attention"] for v in (await c.get("/v1/vms")).json()}
        assert marks == {"vm0": REASON, "vm1": None}

    _manager(world, url, test)
    db = Database(url)
    monkeypatch.setattr(vm_cli, "server_client", lambda lab=None: _Manager(Inventory(db)))
    cli = CliRunner()
    env = {"COLUMNS": "250"}
    listed = cli.invoke(cli_app, ["vm", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    line = {ln.split()[1]: ln for ln in listed.stdout.splitlines() if "vm" in ln}
    assert "running !" in line["vm0"] and REASON in line["vm0"]
    assert "!" not in line["vm1"] and REASON not in line["vm1"]
    shown = cli.invoke(cli_app, ["vm", "show", "vm0"], env=env)
    assert shown.exit_code == 0 and REASON in shown.stdout, shown.output
    as_json = cli.invoke(cli_app, ["vm", "show", "vm0", "--json"], env=env)
    assert json.loads(as_json.stdout)["attention"] == REASON
    calm = cli.invoke(cli_app, ["vm", "show", "vm1"], env=env)
    assert "attention" not in calm.stdout  # no column when no VM needs it
    db.engine.dispose()


# ---------------------------------------------------------------------- what it blocks


def test_drs_and_a_maintenance_evacuation_leave_a_marked_vm_where_it_is(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path, {"h1": ["marked", "free"]})
    _mark(url, "marked")

    async def test(c: Client) -> None:
        # A must rule both break: DRS moves the free VM, the marked one stays (and says why).
        rule = {"name": "there", "kind": "run-on", "vms": ["marked", "free"], "hosts": ["h2"]}
        assert (await c.post("/v1/rules", json=rule)).status_code == 201
        run = (await c.post("/v1/drs/run")).json()
        assert {"vm": "marked", "reason": _left(REASON)} in run["unplaced"], run
        assert [(r["vm"], r["target"]) for r in run["recommendations"]] == [("free", "h2")]
        r = await c.post("/v1/hosts/h1/maintenance")
        assert r.status_code == 202, r.text
        task = await _wait(c, r.json()["task_id"])
        # The other VM left; the marked one stayed, and the task says why.
        assert task.error is not None and _left(REASON) in task.error, task.error
        host = next(h for h in (await c.get("/v1/hosts")).json() if h["name"] == "h1")
        assert host["state"] == "entering-maintenance"
        assert "marked" in host["maintenance_reason"]

    _manager(world, url, test)
    assert world.running_copies("marked") == ["h1"]
    assert world.running_copies("free") == ["h2"]


def _left(reason: str) -> str:
    return f"needs attention, left where it is: {reason}"


def test_live_storage_and_cold_migrations_of_a_marked_vm_are_refused(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path, {"h1": ["vm0", "cold"]})
    world.vms["h1"]["cold"].runstate = "gone"
    db = Database(url)
    with db.session() as s:
        s.query(Vm).filter_by(name="cold").one().state = "stopped"
    db.engine.dispose()
    _mark(url, "vm0")
    _mark(url, "cold")

    async def test(c: Client) -> None:
        requests: list[tuple[str, dict[str, Any]]] = [
            ("vm0", {"to": "h2"}),  # live
            ("vm0", {"datastore": "fast"}),  # storage
            ("cold", {"to": "h2"}),  # cold
        ]
        for vm, body in requests:
            r = await c.post(f"/v1/vms/{vm}/migrate", json=body)
            assert r.status_code == 409, (body, r.text)
            error = r.json()["error"]
            assert error["code"] == "vm_attention" and REASON in error["message"], (body, error)
        assert (await c.get("/v1/tasks")).json() == []

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h1"]
    assert "cold" in world.vms["h1"] and "cold" not in world.vms["h2"]


OLD_SCHEMA = """
CREATE TABLE hosts (
    id INTEGER NOT NULL,
    name VARCHAR(64) NOT NULL,
    agent_url VARCHAR(256) NOT NULL,
    token VARCHAR(256) NOT NULL,
    state VARCHAR(16) NOT NULL,
    facts JSON,
    registered_at DATETIME NOT NULL,
    last_seen DATETIME,
    PRIMARY KEY (id),
    UNIQUE (name)
);
CREATE TABLE vms (
    id INTEGER NOT NULL,
    name VARCHAR(64) NOT NULL,
    uuid VARCHAR(36) NOT NULL,
    mac VARCHAR(17) NOT NULL,
    address VARCHAR(32),
    host_id INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL,
    spec JSON NOT NULL,
    memory_mib INTEGER NOT NULL,
    created_at DATETIME NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (name),
    UNIQUE (uuid),
    UNIQUE (mac),
    UNIQUE (address),
    FOREIGN KEY(host_id) REFERENCES hosts (id)
);
"""
