"""Several manager replicas on one database (SQLite and PostgreSQL): leases, takeover of a
dead replica's migration, fencing of a live one that lost it, cluster-wide slots, and the
claims two replicas race for (one migration per VM, a recommendation, a schedule's run)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError

from qmotion.api.schedule import ScheduleCreate
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.migration.vocabulary import Phase
from qmotion.server.automation.schedules import Schedules
from qmotion.server.db import Database, Recommendation, Task, TaskEvent, Vm
from qmotion.server.http.app import create_app
from qmotion.server.replicas import Membership
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import World
from tests.unit.manager_app import TOKEN
from tests.unit.test_schedules import FakeActions

T = TypeVar("T")


class Wall:
    """The replicas' wall clock, moved by the test (leases expire when it says)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
        self.mono = 0.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def _member(db: Database, name: str, wall: Wall, lease_s: float = 10.0) -> Membership:
    return Membership(db, name, lease_s, clock=wall, monotonic=wall.monotonic)


def _world(db: Database, vms: int = 1, polls: int = 12) -> World:
    world = World(polls_to_complete=polls, duration_s=0.0)
    world.register_hosts(db)
    for i in range(vms):
        world.add_running_vm(db, f"vm{i}", "h1")
    return world


def _events(db: Database, task_id: int) -> list[str]:
    with db.session() as s:
        return [
            e.message
            for e in s.query(TaskEvent).filter_by(task_id=task_id).order_by(TaskEvent.id).all()
        ]


def _host_of(db: Database, vm: str) -> str:
    with db.session() as s:
        return s.query(Vm).filter_by(name=vm).one().host.name


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(4000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


def _phase(db: Database, task_id: int) -> str | None:
    with db.session() as s:
        t = s.get(Task, task_id)
        assert t is not None
        return t.phase


# ---------------------------------------------------------------------- leases


def test_one_leader_at_a_time_and_a_new_token_at_each_change(db_url: str) -> None:
    db, wall = Database(db_url), Wall()
    a, b = _member(db, "a", wall), _member(db, "b", wall)
    a.join()
    b.join()
    first = a.lead()
    assert first is not None and b.lead() is None and a.leading() and not b.leading()
    assert a.lead() == first  # renewed, same token
    wall.advance(11)  # a stopped renewing: its lease is over
    second = b.lead()
    assert second is not None and second > first
    # a comes back: it does not lead, and knows it (it stopped acting at 80 % of its lease).
    assert a.lead() is None and not a.leading()
    b.leave()
    third = a.lead()
    assert third is not None and third > second  # a clean stop hands over at once


def test_a_second_process_under_a_name_fences_the_first(db_url: str) -> None:
    db, wall = Database(db_url), Wall()
    old, new = _member(db, "m1", wall), _member(db, "m1", wall)
    old.join()
    assert old.renew()
    new.join()
    assert new.epoch == old.epoch + 1
    assert not old.renew() and new.renew()


# ---------------------------------------------------------------------- takeover


def test_a_dead_replicas_migration_is_taken_over_and_completes_once(db_url: str) -> None:
    """Replica a dies (stops renewing, its work gone) in the middle of the copy; b takes the
    task over a lease later, resumes it from its persisted state, and it completes: one copy
    runs, on the destination, and the inventory says so."""
    db, wall = Database(db_url), Wall()
    world = _world(db)

    async def main() -> tuple[TaskOut, TaskRunner]:
        a = world.runner(db, membership=_member(db, "a", wall))
        b = world.runner(db, membership=_member(db, "b", wall))
        a.recover_after_restart()
        b.recover_after_restart()
        task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
        await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
        await a.abandon_all()  # a's process is gone (SIGKILL: no leave, no renewal)
        assert world.vms["h1"]["vm0"].migration == "active"
        b._start(b._claim_orphans())
        assert not b._running, "taken over before a's lease ended"
        wall.advance(11)
        b._start(b._claim_orphans())
        return await world.run_to_end(b, task), a

    task, _ = asyncio.run(main())
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"] and _host_of(db, "vm0") == "h2"
    events = _events(db, task.id)
    assert any("taken over by replica b from a" in e for e in events), events
    assert events.count("succeeded") == 1
    with db.session() as s:
        t = s.get(Task, task.id)
        assert t is not None and t.owner == "b"


def test_a_live_replica_that_lost_its_task_stops_at_its_next_step(db_url: str) -> None:
    """Replica a is still running the migration when b takes it over (a's lease ran out,
    say a long pause): a's next write is refused and its work on the task stops; b
    finishes it; one copy runs and the task ends once."""
    db, wall = Database(db_url), Wall()
    world = _world(db, polls=40)

    async def main() -> tuple[TaskOut, TaskRunner]:
        a = world.runner(db, membership=_member(db, "a", wall))
        b = world.runner(db, membership=_member(db, "b", wall))
        a.recover_after_restart()
        b.recover_after_restart()
        task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
        await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
        wall.advance(11)
        b.membership.renew()
        b._start(b._claim_orphans())
        assert task.id in b._running
        await _until(lambda: task.id not in a._running, "a stopped")
        return await world.run_to_end(b, task), a

    task, _ = asyncio.run(main())
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"] and _host_of(db, "vm0") == "h2"
    assert _events(db, task.id).count("succeeded") == 1


def test_a_cancel_asked_through_another_replica_reaches_the_owner(db_url: str) -> None:
    db, wall = Database(db_url), Wall()
    world = _world(db, polls=400)

    async def main() -> TaskOut:
        a = world.runner(db, membership=_member(db, "a", wall, lease_s=0.3))
        b = world.runner(db, membership=_member(db, "b", wall, lease_s=0.3))
        a.recover_after_restart()
        b.recover_after_restart()
        keep = asyncio.ensure_future(a.keep_leases())
        try:
            task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
            await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
            b.cancel(task.id)  # b's API: b does not run it
            return await world.run_to_end(a, task)
        finally:
            keep.cancel()

    task = asyncio.run(main())
    assert task.state == TaskState.CANCELLED, task.error
    assert world.running_copies("vm0") == ["h1"] and _host_of(db, "vm0") == "h1"


def test_slots_are_counted_across_replicas(db_url: str) -> None:
    """Two replicas each start three moves off h1 with a limit of two per host: the agents
    never see more than two at once on h1, and all six complete."""
    db, wall = Database(db_url), Wall()
    world = World(polls_to_complete=6, duration_s=0.3)
    world.register_hosts(db)
    for i in range(6):
        world.add_running_vm(db, f"vm{i}", "h1")

    async def main() -> list[TaskOut]:
        runners = [
            world.runner(db, membership=_member(db, n, wall), per_host=2) for n in ("a", "b")
        ]
        for r in runners:
            r.recover_after_restart()
        tasks = [
            await runners[i % 2].submit_migration(f"vm{i}", MigrateRequest(to="h2"))
            for i in range(6)
        ]
        return [await world.run_to_end(runners[i % 2], t) for i, t in enumerate(tasks)]

    done = asyncio.run(main())
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 6, [t.error for t in done]
    assert world.max_active_per_host == {"h1": 2, "h2": 2}
    assert all(world.running_copies(f"vm{i}") == ["h2"] for i in range(6))


# ---------------------------------------------------------------------- races between replicas


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://manager",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def test_twenty_submits_through_two_replicas_make_one_task(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        # Two managers on one SQLite file is not a deployment: a writer waits for the other's
        # lock, so a submission can come after the first move ended (and rightly succeed).
        pytest.skip("several replicas need PostgreSQL")
    db = Database(db_url)
    world = _world(db, polls=3)
    apps = [create_app(db_url, TOKEN, agents=world.connector(), replica=n) for n in ("a", "b")]

    async def main() -> list[int]:
        async with _client(apps[0]) as ca, _client(apps[1]) as cb:
            answers = await asyncio.gather(
                *(
                    (ca if i % 2 else cb).post("/v1/vms/vm0/migrate", json={"to": "h2"})
                    for i in range(20)
                )
            )
            (accepted,) = [r for r in answers if r.status_code == 202]
            task_id = accepted.json()["id"]
            for _ in range(2000):
                t = (await ca.get(f"/v1/tasks/{task_id}")).json()
                if t["state"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.01)
            assert t["state"] == "succeeded", t
            return [r.status_code for r in answers]

    assert sorted(asyncio.run(main())) == [202] + [409] * 19
    assert world.running_copies("vm0") == ["h2"]
    with db.session() as s:
        assert s.query(Task).filter_by(vm="vm0").count() == 1


def test_two_replicas_applying_one_recommendation_one_wins(db_url: str) -> None:
    db = Database(db_url)
    world = _world(db, polls=3)
    with db.session() as s:
        rec = Recommendation(
            run_id=1, vm="vm0", source="h1", target="h2", priority=3, reason="balance",
            gain=0.2, wave=0,
        )  # fmt: skip
        s.add(rec)
        s.flush()
        rec_id = rec.id
    apps = [create_app(db_url, TOKEN, agents=world.connector(), replica=n) for n in ("a", "b")]

    async def main() -> list[int]:
        async with _client(apps[0]) as ca, _client(apps[1]) as cb:
            answers = await asyncio.gather(
                *(c.post("/v1/drs/apply", json={"ids": [rec_id]}) for c in (ca, cb, ca, cb))
            )
            (won,) = [r for r in answers if r.status_code == 202]
            for _ in range(2000):
                t = (await ca.get(f"/v1/tasks/{won.json()['id']}")).json()
                if t["state"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.01)
            return [r.status_code for r in answers]

    assert sorted(asyncio.run(main())) == [202, 409, 409, 409]
    assert world.running_copies("vm0") == ["h2"]
    with db.session() as s:
        assert s.query(Task).filter_by(vm="vm0").count() == 1


def test_a_schedule_fires_once_across_replicas(db_url: str) -> None:
    """Two replicas tick at the same moment, each in its own thread, over five due runs:
    each run starts once, none is lost."""
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    actions = FakeActions()
    replicas = [Schedules(Database(db_url), actions, lambda: now) for _ in range(2)]
    for i in range(5):
        replicas[0].create(
            ScheduleCreate(action="migrate", vm=f"vm{i}", to="h2", at=now + timedelta(seconds=30))
        )
    now += timedelta(seconds=31)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def tick(r: Schedules) -> None:
        start.wait()
        try:
            asyncio.run(r.tick())
        except Exception as exc:  # SQLite: the loser of a write race ("database is locked")
            errors.append(exc)

    threads = [threading.Thread(target=tick, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in replicas:  # the next round, as run_forever would have
        asyncio.run(r.tick())
    assert sorted(c[1] for c in actions.calls) == [f"vm{i}" for i in range(5)], errors


def test_a_replica_cut_off_from_its_database_gets_its_task_back(db_url: str) -> None:
    """The database is out of reach for two leases in the middle of a copy (every renewal
    and join fails): the replica stops its work, joins again once the database is back, and
    claims its task back from its old epoch; the move completes, never left unowned."""
    db = Database(db_url)
    world = _world(db, polls=200)
    me = Membership(db, "a", lease_s=0.3)
    down = [False]
    renew, rejoin = me.renew, me.rejoin

    def cut(real: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            if down[0]:
                raise ConnectionError("the database is out of reach")
            return real()

        return call

    me.renew, me.rejoin = cut(renew), cut(rejoin)  # type: ignore[method-assign]

    async def main() -> TaskOut:
        a = world.runner(db, membership=me)
        a.recover_after_restart()
        keep = asyncio.ensure_future(a.keep_leases())
        try:
            task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
            await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
            first_epoch = me.epoch
            down[0] = True
            await _until(lambda: task.id not in a._running, "a stopped its work")
            await asyncio.sleep(0.6)
            down[0] = False
            await _until(lambda: me.epoch > first_epoch and task.id in a._running, "taken back")
            return await world.run_to_end(a, task)
        finally:
            keep.cancel()

    task = asyncio.run(main())
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"] and _host_of(db, "vm0") == "h2"
    assert any("manager restarted: resuming" in e for e in _events(db, task.id))


def test_a_replica_past_its_fence_point_stops_and_claims_its_task_back(db_url: str) -> None:
    """The replica's clock says its last renewal is older than 80 % of the lease (its loop
    stalled): its guard stops the task before the next action, and its lease keeper joins
    again and takes the task back: it completes, never a running task with no coroutine."""
    db = Database(db_url)
    world = _world(db, polls=200)
    me = Membership(db, "a", lease_s=0.3)
    acted_while_fenced: list[str] = []

    def note(w: World, k: int, host: str, path: str) -> None:
        # A poll of the copy's progress (a read) may finish its action; nothing may change.
        if me.fenced() and w.requests[-1][1] != "GET":
            acted_while_fenced.append(f"{w.requests[-1][1]} {path}")

    async def main() -> TaskOut:
        a = world.runner(db, membership=me)
        a.recover_after_restart()
        keep = asyncio.ensure_future(a.keep_leases())
        try:
            task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
            await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
            first_epoch = me.epoch
            world.before_request = note
            me.renewed -= 10.0  # as if the loop had not run for 10 s
            await _until(lambda: me.epoch > first_epoch, "joined again")
            world.before_request = None
            return await world.run_to_end(a, task)
        finally:
            keep.cancel()

    task = asyncio.run(main())
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"] and _host_of(db, "vm0") == "h2"
    assert acted_while_fenced == [], acted_while_fenced


def test_a_replica_frozen_inside_a_step_lets_go_of_the_task_row(db_url: str) -> None:
    """Replica a freezes (SIGSTOP) inside a step's transaction, holding the task row's lock:
    b's claims skip a locked row, so the database ends a's transaction once it idles a lease
    long; b then takes the task over and it completes once, with one copy."""
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks that outlive a frozen process: PostgreSQL's (SQLite has one writer)")
    db, wall = Database(db_url), Wall()
    world = _world(db)

    async def main() -> TaskOut:
        a = world.runner(db, membership=_member(db, "a", wall, lease_s=2.0))
        b = world.runner(db, membership=_member(db, "b", wall, lease_s=2.0))
        a.recover_after_restart()
        b.recover_after_restart()
        task = await a.submit_migration("vm0", MigrateRequest(to="h2"))
        await _until(lambda: _phase(db, task.id) == Phase.MONITOR, "copying")
        await a.abandon_all()
        with contextlib.ExitStack() as frozen:
            # a's step took the row's lock, then a froze before it committed.
            frozen.enter_context(contextlib.suppress(DBAPIError))  # its session ends under it
            s = frozen.enter_context(db.session())
            a.owned_task(s, task.id)
            wall.advance(3)  # a's lease has ended
            b._start(b._claim_orphans())
            assert not b._running, "claimed a row another transaction holds"
            for _ in range(100):  # real time: the database's own timer, ~2 s
                await asyncio.sleep(0.1)
                b._start(b._claim_orphans())
                if b._running:
                    break
            assert b._running, "b never got the task: a's frozen transaction kept the row"
        return await world.run_to_end(b, task)

    task = asyncio.run(main())
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"] and _host_of(db, "vm0") == "h2"
    assert _events(db, task.id).count("succeeded") == 1
