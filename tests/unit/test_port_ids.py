"""Issue 22, interleavings 2 and 3, through the manager's real task runner and port against the
scripted agents: every agent call of a migration carries its id, and an agent answers
"completed" or "migrated away" for that migration only.

2. The destination agent unreachable from the switchover through recover: the task must not
   give the destination up (it runs), and a second migration of the VM from the source must
   not take the old migration's ``completed`` for its own switchover and resume the stale
   source copy: never two running copies.
3. A QEMU that arrived by migration reports ``completed`` until it sends a stream of its own:
   a rollback before ``migrate`` is issued (prepare failed, a cancel during the disk copy,
   start refused) must not read it as the switchover.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.api.vm import Disk
from qmotion.server.db import Database, Vm
from tests.unit.agent_world import World, _facts

Hook = Callable[[World, int, str, str], None]
DISK = Disk(datastore="local-h1", path="vm1/disk0.qcow2", bootable=True)


def _local(host: str) -> dict[str, Any]:
    return _facts() | {"datastores": [{"name": f"local-{host}", "path": "/x", "shared": False}]}


def _setup(tmp_path: Path, *, disks: bool = False) -> tuple[World, Database]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    world = World(hosts=("h1", "h2", "h3"), polls_to_complete=2)
    world.register_hosts(db, _local if disks else None)
    world.add_running_vm(db, "vm1", "h1", disks=[DISK] if disks else None)
    return world, db


def _migrate(
    world: World,
    db: Database,
    req: MigrateRequest,
    hook: Hook | None,
    cancel_when: Callable[[World, int, str, str], bool] | None,
) -> TaskOut:
    """One migration through a fresh task runner (a manager), to its end; ``cancel_when``
    returns true just before the request at which the operator cancels."""

    async def main() -> TaskOut:
        runner = world.runner(db)
        loop = asyncio.get_running_loop()
        task_id: list[int] = []

        def before(w: World, k: int, host: str, path: str) -> None:
            if cancel_when is not None and task_id and cancel_when(w, k, host, path):
                loop.call_soon_threadsafe(runner.cancel, task_id[0])
            if hook is not None:
                hook(w, k, host, path)

        world.before_request = before
        task = await runner.submit_migration("vm1", req)
        task_id.append(task.id)
        return await world.run_to_end(runner, task)

    return asyncio.run(main())


def _row(db: Database) -> Vm:
    with db.session() as s:
        row = s.query(Vm).filter_by(name="vm1").one()
        s.expunge(row)
        return row


def _inventory_host(db: Database) -> str:
    with db.session() as s:
        return s.query(Vm).filter_by(name="vm1").one().host.name


def _clear_attention(db: Database) -> None:
    """An operator clears the mark (or the manager predates it): the engine alone must keep
    the VM on one host."""
    with db.session() as s:
        row = s.query(Vm).filter_by(name="vm1").one()
        if hasattr(row, "attention"):
            row.attention = None


def test_destination_unreachable_from_the_switchover_then_a_second_migration(
    tmp_path: Path,
) -> None:
    world, db = _setup(tmp_path)
    most: list[int] = [0]

    def h2_unreachable_from_the_switchover(w: World, k: int, host: str, path: str) -> None:
        src = w.vms["h1"].get("vm1")
        if src is not None and src.migration == "completed":
            w.unreachable.add("h2")  # the manager cannot reach it; the source agent could
        most[0] = max(most[0], len(w.running_copies("vm1")))

    first = _migrate(world, db, MigrateRequest(to="h2"), h2_unreachable_from_the_switchover, None)
    # The destination runs (the source agent's word reached it); nothing removed, nothing
    # resumed on a guess; the task says it could not confirm, and the VM is marked.
    assert world.running_copies("vm1") == ["h2"], (first.error, world.requests)
    assert first.state == TaskState.FAILED
    assert world.vms["h1"]["vm1"].runstate == "postmigrate"
    assert getattr(_row(db), "attention", "n/a") is not None

    _clear_attention(db)
    world.requests.clear()
    second = _migrate(world, db, MigrateRequest(to="h3"), h2_unreachable_from_the_switchover, None)
    assert most[0] == 1, (most, world.running_copies("vm1"))
    assert world.running_copies("vm1") == ["h2"], (second.error, world.requests)
    # The stale source copy was never resumed, and the second migration's destination went.
    assert world.vms["h1"]["vm1"].runstate == "postmigrate"
    assert second.state == TaskState.FAILED
    assert "vm1" not in world.vms["h3"]
    # Once the destination answers again, the manager can see which copy is which.
    world.unreachable.discard("h2")
    assert world._info("h2", world.vms["h2"]["vm1"]).incoming_migration is not None


STEPS = ("prepare-failed", "cancel-during-disk-copy", "start-refused")


@pytest.mark.parametrize("where", STEPS)
def test_an_arrivals_completed_is_not_a_switchover(tmp_path: Path, where: str) -> None:
    """vm1 arrived on h2 by a migration (its QEMU reports ``completed``); moving it on to h3
    rolls back before ``migrate`` is issued. The rollback must resume nothing of a switchover
    that did not happen: the VM stays on h2, the destination on h3 goes, the task ends as its
    cause says (postcopy allowed: a recovery would refuse and leave h3's QEMU behind)."""
    disks = where == "cancel-during-disk-copy"
    world, db = _setup(tmp_path, disks=disks)
    first = MigrateRequest(to="h2", datastore="local-h2" if disks else None)
    arrived = _migrate(world, db, first, _complete_after_sync, None)
    assert arrived.state == TaskState.SUCCEEDED and world.running_copies("vm1") == ["h2"]
    assert world.vms["h2"]["vm1"].migration == "completed"  # the arrival's, as QEMU says
    world.requests.clear()

    def cancel_when(w: World, k: int, host: str, path: str) -> bool:
        return where == "cancel-during-disk-copy" and path.endswith("/migration/mirror")

    if where == "prepare-failed":
        world.fail_next[("POST", "/v1/migrations/incoming")] = [500]
    elif where == "start-refused":
        world.fail_next[("POST", "/v1/vms/vm1/migration")] = [409]
    req = MigrateRequest(to="h3", allow_postcopy=True, datastore="local-h3" if disks else None)
    task = _migrate(world, db, req, None, cancel_when)
    assert world.running_copies("vm1") == ["h2"], (task.error, world.requests)
    assert _inventory_host(db) == "h2"
    expected = TaskState.CANCELLED if where == "cancel-during-disk-copy" else TaskState.FAILED
    assert task.state == expected, (task.state, task.error)
    # Nothing was left on h3, recorded or not: its destination went with the rollback.
    assert "vm1" not in world.vms["h3"] and world.files["h3"] == set(), world.vms["h3"]
    assert task.result is not None and task.result.leftovers == []
    # No switchover was read into it: no word to h3, the source never "recovered", and the
    # operator is told the cause.
    assert not [r for r in world.requests if r[2] == "/v1/vms/vm1/migration/finish"]
    cause = {"prepare-failed": "scripted 500", "start-refused": "scripted 409"}.get(where)
    assert cause is None or cause in (task.error or ""), task.error
    phases = [e.data.get("phase") for e in _events(world, db, task) if e.data]
    assert "verify_destination" not in phases and "recover" not in phases, phases


def _events(world: World, db: Database, task: TaskOut) -> list[Any]:
    return world.runner(db).get(task.id).events


def _complete_after_sync(w: World, k: int, host: str, path: str) -> None:
    """Shared-nothing: QEMU completes once the memory moves (the world's mirror syncs)."""
    src = w.vms["h1"].get("vm1")
    if src is not None and src.mirror == "ready" and src.migration == "active" and src.polls:
        w.complete("vm1")
