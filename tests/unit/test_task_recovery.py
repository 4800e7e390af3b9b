"""Issue 22's other findings, through the manager's real task runner and port against the
scripted agents: what is not the migration's fault never ends it while QEMU moves, and a
guest paused for the switchover is never left paused.

- a database error inside a step (here: persisting the monitor's step) is retried: the task
  ends with the VM on the destination, not "internal error" with QEMU still migrating;
- ``postcopy_requested`` is persisted before postcopy is asked for: a manager restarted while
  the destination runs in postcopy (the source unreachable) recovers the stream and finishes
  the migration, instead of taking it as finished with the source still holding pages;
- a device state that does not go through (the guest paused on the source) is abandoned:
  the source resumes the guest, the destination goes.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import OperationalError

from qmotion.api.migration import MigrationStats
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.migration.vocabulary import Phase, Step
from qmotion.server.db import Database, Task, Vm
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import MIB, Guest, Link, World

OUTRUNS_THE_LINK = Guest(sweep_bps=100e6, dma_bytes=8 * MIB)
LINK = Link(bandwidth_bps=50e6, rtt_ms=0.3)


def _setup(db_url: str, guest: Guest | None = None) -> tuple[World, Database]:
    world = World(link=LINK, polls_to_complete=3)
    db = Database(db_url)
    world.register_hosts(db)
    world.add_running_vm(db, "vm1", "h1", guest=guest)
    return world, db


def _host_of(db: Database) -> str:
    with db.session() as s:
        return s.query(Vm).filter_by(name="vm1").one().host.name


class LockedOnce(TaskRunner):
    """A manager whose database fails once ("database is locked") persisting a step of the
    monitor phase: QEMU migrates on meanwhile."""

    failed = False

    def _persist(self, task_id: int, st: Step, stats: MigrationStats | None, *args: object) -> None:
        if st.state.phase == Phase.MONITOR and not self.failed:
            type(self).failed = True
            raise OperationalError("UPDATE tasks", {}, Exception("database is locked"))
        super()._persist(task_id, st, stats, *args)  # type: ignore[arg-type]


def test_a_database_error_while_monitoring_does_not_end_the_migration(db_url: str) -> None:
    world, db = _setup(db_url)

    async def main() -> TaskOut:
        runner = world.runner(db, LockedOnce)
        task = await runner.submit_migration("vm1", MigrateRequest(to="h2"))
        return await world.run_to_end(runner, task)

    task = asyncio.run(main())
    assert LockedOnce.failed
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm1") == ["h2"] and _host_of(db) == "h2"
    assert "vm1" not in world.vms["h1"]


def test_a_manager_restarted_in_postcopy_recovers_the_stream(db_url: str) -> None:
    """The ladder asks for postcopy (the guest outruns the link); the manager dies as it
    asks, before the answer is back, and comes back while the source's agent cannot be
    reached. The destination runs with pages still on the source: the restarted manager goes
    forward in postcopy (recovering the stream until the source answers again) and ends with
    the migration completed and the source released."""
    world, db = _setup(db_url, OUTRUNS_THE_LINK)
    crashed: list[bool] = []
    most = [0]

    async def first_manager() -> TaskOut:
        runner = world.runner(db)
        loop = asyncio.get_running_loop()

        def crash_after_postcopy(w: World, k: int, host: str, path: str) -> None:
            # The tune that asks for postcopy: the manager dies before its answer is back.
            if not crashed and host == "h1" and w.requests[-1][1] == "PATCH":
                crashed.append(True)
                asyncio.run_coroutine_threadsafe(runner.shutdown(), loop)
            elif crashed:
                w.unreachable.add("h1")  # from the crash on, until after the restart

        world.before_request = crash_after_postcopy
        task = await runner.submit_migration("vm1", MigrateRequest(to="h2", allow_postcopy=True))
        for _ in range(4000):
            if crashed and not runner._running:
                break
            await asyncio.sleep(0.005)
        return task

    task = asyncio.run(first_manager())
    world.unreachable.add("h1")
    assert crashed and world.vms["h1"]["vm1"].migration == "postcopy-active"
    assert world.vms["h2"]["vm1"].runstate == "running"  # postcopy: it runs
    with db.session() as s:
        t = s.get(Task, task.id)
        assert t is not None and t.state == TaskState.RUNNING  # left behind by the crash

    def source_back_once_recovering(w: World, k: int, host: str, path: str) -> None:
        if path.endswith("/migration/recover-incoming"):
            w.unreachable.discard("h1")
        most[0] = max(most[0], len(w.running_copies("vm1")))

    async def second_manager() -> TaskOut:
        runner = world.runner(db)
        world.before_request = source_back_once_recovering
        runner.recover_after_restart()
        return await world.run_to_end(runner, task)

    n = len(world.requests)
    done = asyncio.run(second_manager())
    assert done.state == TaskState.SUCCEEDED, done.error
    assert done.phase == Phase.DONE, done.phase  # confirmed: the source let its copy go
    assert "vm1" not in world.vms["h1"], world.vms["h1"]["vm1"].migration
    assert world.running_copies("vm1") == ["h2"] and _host_of(db) == "h2"
    assert most[0] == 1
    # It went forward in postcopy: the stream recovered, not taken as finished.
    assert ("h2", "POST", "/v1/vms/vm1/migration/recover-incoming") in world.requests[n:]


def test_a_device_state_that_does_not_go_through_is_abandoned(db_url: str) -> None:
    """QEMU sends the device state with the guest paused; the link dies then: the source's
    status stays ``device``. After DEVICE_STUCK_S the migration is cancelled at once (no
    wait for a switchover that cannot end): the guest runs on the source again."""
    world, db = _setup(db_url, OUTRUNS_THE_LINK)

    def stuck_in_device(w: World, k: int, host: str, path: str) -> None:
        src = w.vms["h1"].get("vm1")
        p = src.precopy if src is not None else None
        if src is not None and src.migration == "active" and p is not None and p.syncs >= 2:
            src.migration, src.runstate = "device", "finish-migrate"

    async def main() -> TaskOut:
        runner = world.runner(db)
        world.before_request = stuck_in_device
        task = await runner.submit_migration("vm1", MigrateRequest(to="h2"))
        return await world.run_to_end(runner, task)

    started = world.clock.t
    task = asyncio.run(main())
    assert task.state == TaskState.FAILED and "device state" in (task.error or ""), task.error
    assert world.running_copies("vm1") == ["h1"] and _host_of(db) == "h1"
    assert "vm1" not in world.vms["h2"]
    assert world.clock.t - started < 60  # abandoned in seconds, not when TCP gives up
