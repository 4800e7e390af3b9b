"""Reconcile on the live manager: a host refresh compares what the scripted agents hold with the
inventory and settles what is certain (issue 22).

Each test sets a world state directly (the records the agents keep: FakeVm.outgoing/incoming),
refreshes the hosts through the manager's API (`POST /v1/hosts/refresh`, which reconciles
after the facts) and reads the outcome from the agents and the inventory: where the VM runs,
how many copies, what the inventory names, the mark.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from qmotion.api.vm import Disk
from qmotion.server.db import Database, Task, Vm
from qmotion.server.http import app as http_app
from qmotion.server.http.app import create_app
from qmotion.server.inventory import Inventory
from tests.unit.agent_world import FakeVm, World
from tests.unit.agent_world.cluster import InRecord, OutRecord
from tests.unit.manager_app import TOKEN, Client
from tests.unit.manager_app import run_manager as _manager

M = "0123456789abcdef" * 2
UNCONFIRMED = "switchover unconfirmed: the destination agent did not answer"


def _cluster(tmp_path: Path, hosts: tuple[str, ...] = ("h1", "h2")) -> tuple[World, str]:
    """``vm`` running on h1 (the inventory's host)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=hosts)
    world.register_hosts(db)
    world.add_running_vm(db, "vm", "h1")
    db.engine.dispose()
    return world, url


def _left(world: World, host: str, migration: str = M) -> FakeVm:
    """``host``'s copy completed ``migration`` away: QEMU in postmigrate."""
    v = world.vms[host]["vm"]
    v.runstate, v.migration = "postmigrate", "completed"
    v.outgoing = OutRecord(id=migration, uri="tcp:198.18.0.2:4444")
    return v


def _arrived(world: World, host: str, runstate: str, migration: str = M) -> FakeVm:
    """The destination of ``migration`` on ``host``: started paused (-S), stream loaded."""
    first = next(h["vm"] for h in world.vms.values() if "vm" in h)
    v = FakeVm(spec=first.spec, runstate=runstate, migration="completed")
    v.incoming = InRecord(id=migration, start="paused", finish=runstate == "running")
    world.vms[host]["vm"] = v
    return v


def _refresh(world: World, url: str, rounds: int = 1) -> None:
    async def test(c: Client) -> None:
        for _ in range(rounds):
            r = await c.post("/v1/hosts/refresh")
            assert r.status_code == 200, r.text

    _manager(world, url, test)


def _record(url: str) -> tuple[str, str | None, list[str]]:
    """The inventory's host of ``vm``, its mark and its disks' paths."""
    db = Database(url)
    try:
        with db.session() as s:
            row = s.query(Vm).filter_by(name="vm").one()
            return row.host.name, row.attention, [d["path"] for d in row.spec["disks"]]
    finally:
        db.engine.dispose()


def _mark(url: str, reason: str) -> None:
    db = Database(url)
    Inventory(db).set_attention("vm", reason)
    db.engine.dispose()


def _copies(world: World) -> dict[str, str]:
    return {h: v.runstate for h in world.hosts if (v := world.vms[h].get("vm")) is not None}


def test_the_running_destination_is_recorded_and_the_paused_source_released(
    tmp_path: Path,
) -> None:
    """Issue 22, finding 2, as the task left it: FAILED, the inventory names h1 (paused in
    postmigrate after migration M), the VM runs on h2 with its own copied disk."""
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    dst = _arrived(world, "h2", "running")
    dst.spec = dst.spec.model_copy(update={"disks": [Disk(datastore="local", path="vm/d0")]})
    _mark(url, UNCONFIRMED)
    _refresh(world, url)
    assert _copies(world) == {"h2": "running"}  # the stale copy is gone, the VM runs once
    assert dst.incoming is None  # its arrival confirmed (keep-disks with the id)
    assert _record(url) == ("h2", None, ["vm/d0"])  # host and disks of the running copy
    _refresh(world, url)  # settled: the next round changes nothing
    assert _copies(world) == {"h2": "running"} and _record(url) == ("h2", None, ["vm/d0"])


def test_a_paused_destination_gets_the_word_when_its_source_completed(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    _arrived(world, "h2", "paused")
    _refresh(world, url)
    assert _copies(world) == {"h2": "running"}
    assert _record(url) == ("h2", None, [])


def test_a_stale_source_stays_until_its_twin_is_seen_running(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    _arrived(world, "h2", "running")
    world.down.add("h2")  # its agent does not answer
    _refresh(world, url)
    # Nothing released: no copy was seen running. The VM is marked, naming what it saw.
    assert _copies(world) == {"h1": "postmigrate", "h2": "running"}
    host, attention, _ = _record(url)
    assert host == "h1" and attention is not None
    assert "postmigrate on h1" in attention and "h2 did not answer" in attention
    world.restart_agent("h2")
    _refresh(world, url)
    assert _copies(world) == {"h2": "running"}
    assert _record(url)[:2] == ("h2", None)


def test_two_running_copies_are_marked_and_nothing_is_destroyed(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    _left(world, "h1").runstate = "running"  # resumed after its migration completed
    _arrived(world, "h2", "running")
    _refresh(world, url)
    assert _copies(world) == {"h1": "running", "h2": "running"}
    host, attention, _ = _record(url)
    assert host == "h1" and attention is not None and "runs on h1 and h2" in attention

    async def blocked(c: Client) -> None:
        r = await c.post("/v1/vms/vm/migrate", json={"to": "h2"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "vm_attention", r.text
        r = await c.delete("/v1/vms/vm", params={"force": "true"})
        assert r.status_code == 409, r.text

    _manager(world, url, blocked)
    assert _copies(world) == {"h1": "running", "h2": "running"}
    del world.vms["h2"]["vm"]  # an operator stops one copy
    _refresh(world, url)
    assert _record(url)[:2] == ("h1", None)  # runs once, where the inventory says


def test_a_paused_source_with_no_twin_is_marked_not_released(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    _refresh(world, url)
    assert _copies(world) == {"h1": "postmigrate"}
    host, attention, _ = _record(url)
    assert host == "h1" and attention is not None and "no copy runs" in attention


def test_a_postcopy_source_is_left_to_its_migration(tmp_path: Path) -> None:
    """The source in postcopy holds pages the destination still needs: never released."""
    world, url = _cluster(tmp_path)
    src = _left(world, "h1")
    src.runstate, src.migration = "finish-migrate", "postcopy-active"
    assert src.outgoing is not None
    src.outgoing.postcopy = True
    _arrived(world, "h2", "running").migration = "postcopy-active"
    _refresh(world, url)
    assert _copies(world) == {"h1": "finish-migrate", "h2": "running"}
    host, attention, _ = _record(url)
    assert host == "h1" and attention is not None and "postcopy-active" in attention


def test_a_leftover_destination_is_removed_and_the_mark_cleared(tmp_path: Path) -> None:
    """A rollback whose teardown failed: the VM runs on h1, M's destination waits on h2 (a
    leftover, removed with M's id); h3 holds a paused copy that is no migration's (marked)."""
    world, url = _cluster(tmp_path, ("h1", "h2", "h3"))
    _arrived(world, "h2", "paused")
    _arrived(world, "h3", "paused").incoming = None
    _mark(url, "rolled back, destination left on h2")
    _refresh(world, url)
    assert _copies(world) == {"h1": "running", "h3": "paused"}
    host, attention, _ = _record(url)
    assert host == "h1" and attention is not None and "h3 holds a copy" in attention
    del world.vms["h3"]["vm"]  # an operator removes it
    _refresh(world, url)
    assert _copies(world) == {"h1": "running"} and _record(url)[:2] == ("h1", None)


def test_a_vm_with_a_task_is_left_to_it(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    _arrived(world, "h2", "running")
    db = Database(url)
    with db.session() as s:
        s.add(Task(kind="migrate", state="running", vm="vm", source="h1", destination="h2"))
    db.engine.dispose()
    _refresh(world, url)
    assert _copies(world) == {"h1": "postmigrate", "h2": "running"}
    assert _record(url)[:2] == ("h1", None)


def test_a_vm_the_inventory_does_not_know_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world, url = _cluster(tmp_path)
    spec = world.vms["h1"]["vm"].spec.model_copy(update={"name": "stray"})
    world.vms["h2"]["stray"] = FakeVm(spec=spec, runstate="running")
    with caplog.at_level(logging.INFO, logger="qmotion.server.reconciler"):
        _refresh(world, url)
    assert "stray" in caplog.text
    assert world.running_copies("stray") == ["h2"] and _record(url)[:2] == ("h1", None)


def test_the_periodic_refresh_reconciles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only `hosts refresh`: the manager's own refresher reconciles after each round."""
    monkeypatch.setattr(http_app, "REFRESH_INTERVAL_S", 0.05)
    world, url = _cluster(tmp_path)
    _left(world, "h1")
    _arrived(world, "h2", "running")
    app = create_app(url, TOKEN, agents=world.connector())

    async def main() -> None:
        async with app.router.lifespan_context(app):
            for _ in range(200):
                if _record(url)[0] == "h2":
                    return
                await asyncio.sleep(0.05)

    asyncio.run(main())
    assert _copies(world) == {"h2": "running"} and _record(url)[:2] == ("h2", None)
