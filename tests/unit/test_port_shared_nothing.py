"""A shared-nothing live migration through the manager's real port and task runner, against
scripted agents (tests/unit/agent_world/): a cancel at every request, QEMU completing at
every request of it, the source agent vanishing, the destination going away mid-copy. After
each: exactly one running copy, its disks on its host, the inventory naming both, and no disk
left where the VM does not run unless the task records it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.api.vm import Disk, VmSpec
from qmotion.server.db import Database, Vm
from qmotion.server.errors import Upstream
from qmotion.server.inventory import Inventory
from qmotion.server.tasks import shared_nothing
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import World, _facts

Hook = Callable[[World, int, str, str], None]
DISK = Disk(datastore="local-h1", path="vm1/disk0.qcow2", bootable=True)


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirror is polled every 10 ms here, not every 0.5 s: the same steps, sooner."""
    monkeypatch.setattr(shared_nothing, "MIRROR_POLL_S", 0.01)


def _host_facts(host: str) -> dict[str, Any]:
    return _facts() | {"datastores": [{"name": f"local-{host}", "path": "/x", "shared": False}]}


def _setup(tmp_path: Path) -> tuple[World, Database]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    world = World(polls_to_complete=10_000)
    world.register_hosts(db, _host_facts)
    world.add_running_vm(db, "vm1", "h1", disks=[DISK])
    return world, db


async def _migrate(
    world: World, db: Database, *, cancel_at: int | None = None, hook: Hook | None = None
) -> TaskOut:
    runner = TaskRunner(
        db, Inventory(db, world.connector()), clock=world.clock.monotonic, sleep=world.sleep
    )
    loop = asyncio.get_running_loop()
    task_id: list[int] = []

    def before(w: World, k: int, host: str, path: str) -> None:
        # (The first requests are the submission's checks: no task to cancel yet.)
        if cancel_at is not None and k == cancel_at and task_id:
            loop.call_soon_threadsafe(runner.cancel, task_id[0])
        if hook is not None:
            hook(w, k, host, path)

    world.before_request = before
    task = await runner.submit_migration("vm1", MigrateRequest(to="h2", datastore="local-h2"))
    task_id.append(task.id)
    return await world.run_to_end(runner, task)


def _complete_after_sync(w: World, k: int, host: str, path: str) -> None:
    """QEMU completes once the memory moves (the scripted agents do not on their own)."""
    src = w.vms["h1"].get("vm1")
    if src is not None and src.migration == "active" and src.polls >= 1:
        w.complete("vm1")


def _check(world: World, db: Database, task: TaskOut) -> str:
    running = world.running_copies("vm1")
    assert len(running) == 1, (running, task.error, world.requests)
    where = running[0]
    assert world.disks_present(where, "vm1"), (where, world.files, task.error)
    with db.session() as s:
        row = s.query(Vm).filter_by(name="vm1").one()
        assert row.host.name == where
        # The inventory names the disks the running copy runs on.
        assert VmSpec.model_validate(row.spec).disks == world.vms[where]["vm1"].spec.disks
    leftovers = task.result.leftovers if task.result else []
    kept = [lo.host for lo in leftovers]
    if where == "h1":
        assert task.state in (TaskState.CANCELLED, TaskState.FAILED)
        if "h2" not in kept:
            assert world.files["h2"] == set(), world.files  # the empty copies went too
            assert "vm1" not in world.vms["h2"]
        warned = any("disk mirror" in w for w in (task.result.warnings if task.result else []))
        assert world.vms["h1"]["vm1"].mirror is None or warned  # the copy stopped
    else:
        assert task.state == TaskState.SUCCEEDED, task.error
        assert world.files["h1"] == set(), world.files  # the old files, once it ran on h2
        assert world.vms["h2"]["vm1"].owned == []  # its copies are its own now
        assert world.vms["h2"]["vm1"].spec.disks[0].datastore == "local-h2"
    return where


def test_the_disks_are_copied_before_the_memory_and_the_old_ones_removed_after(
    tmp_path: Path,
) -> None:
    world, db = _setup(tmp_path)
    task = asyncio.run(_migrate(world, db, hook=_complete_after_sync))
    assert _check(world, db, task) == "h2"
    paths = [(h, m, p) for h, m, p in world.requests]
    mirror_start = paths.index(("h1", "POST", "/v1/vms/vm1/migration/mirror"))
    migrate = paths.index(("h1", "POST", "/v1/vms/vm1/migration"))
    release = paths.index(("h1", "POST", "/v1/vms/vm1/release"))
    keep = paths.index(("h2", "POST", "/v1/vms/vm1/migration/keep-disks"))
    # The memory moves only after the copy was in sync; the destination keeps its disks
    # once seen running, before the source lets go of the old ones.
    assert mirror_start < migrate < keep < release
    assert task.result is not None and task.result.disk_copy_ms is not None
    assert task.mirror is not None and task.mirror.copy_mode == "write-blocking"
    sent = [p for h, kind, p in world.params_received if kind == "outgoing"]
    assert sent[-1].copy_datastore == "local-h2"


def _requests(tmp_path: Path, **kw: Any) -> int:
    world, db = _setup(tmp_path / "dry")
    asyncio.run(_migrate(world, db, hook=_complete_after_sync, **kw))
    return len(world.requests)


def test_a_cancel_at_every_request_leaves_one_copy_on_its_disks(tmp_path: Path) -> None:
    n = _requests(tmp_path)
    outcomes = set()
    for k in range(n + 1):
        world, db = _setup(tmp_path / str(k))
        task = asyncio.run(_migrate(world, db, cancel_at=k, hook=_complete_after_sync))
        outcomes.add(_check(world, db, task))
    assert outcomes == {"h1", "h2"}


@pytest.mark.parametrize("complete_too", [False, True])
def test_the_source_agent_lost_at_every_request(tmp_path: Path, complete_too: bool) -> None:
    """From request k on the source's agent does not answer (its QEMU runs on); with
    ``complete_too`` QEMU completes at that moment. Nothing is deleted on faith."""
    n = _requests(tmp_path)
    for k in range(n + 1):

        def lose_source(w: World, i: int, host: str, path: str, k: int = k) -> None:
            _complete_after_sync(w, i, host, path)
            if i == k:
                if complete_too:
                    w.complete("vm1")
                w.unreachable.add("h1")

        world, db = _setup(tmp_path / str(k))
        try:
            task = asyncio.run(_migrate(world, db, hook=lose_source))
        except Upstream:
            # Lost during the submission's checks: refused, nothing changed anywhere.
            assert world.running_copies("vm1") == ["h1"] and world.files["h2"] == set()
            assert "vm1" not in world.vms["h2"]
            continue
        running = world.running_copies("vm1")
        assert len(running) == 1, (k, running, task.error)
        assert world.disks_present(running[0], "vm1"), (k, world.files)
        if running[0] == "h2":
            assert world.vms["h2"]["vm1"].spec.disks[0].datastore == "local-h2"


def test_the_destination_gone_mid_copy_rolls_back_to_the_source(tmp_path: Path) -> None:
    def kill_destination(w: World, i: int, host: str, path: str) -> None:
        polls = [r for r in w.requests if r[2] == "/v1/vms/vm1/migration/mirror"]
        if len(polls) == 2 and "vm1" in w.vms["h2"]:
            w.vms["h2"]["vm1"].runstate = "gone"  # its QEMU died; the agent still has it

    world, db = _setup(tmp_path)
    task = asyncio.run(_migrate(world, db, hook=kill_destination))
    assert task.state == TaskState.FAILED and "went away" in (task.error or ""), task.error
    assert _check(world, db, task) == "h1"
