"""The task runner and the manager's API over scripted agents: one active task per VM under
concurrent requests, and at most ``per_host`` migrations involving a host at once."""

from __future__ import annotations

import asyncio

import httpx

from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.server.db import Database, Vm
from qmotion.server.http.app import create_app
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import World

TOKEN = "manager-token-0123456789"


def _world(db_url: str, vms: int) -> tuple[World, str]:
    url = db_url
    db = Database(url)
    # Each migration lasts long enough for all the admitted ones to overlap.
    world = World(polls_to_complete=6, duration_s=0.4)
    world.register_hosts(db)
    for i in range(vms):
        world.add_running_vm(db, f"vm{i}", "h1")
    db.engine.dispose()
    return world, url


def test_twenty_concurrent_migrate_requests_accept_exactly_one(db_url: str) -> None:
    world, url = _world(db_url, 1)
    app = create_app(url, TOKEN, agents=world.connector())

    async def main() -> tuple[list[int], TaskOut]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://manager", headers=headers
        ) as c:
            answers = await asyncio.gather(
                *(c.post("/v1/vms/vm0/migrate", json={"to": "h2"}) for _ in range(20))
            )
            accepted = [r for r in answers if r.status_code == 202]
            assert len(accepted) == 1, [r.text for r in answers]
            refused = [r for r in answers if r.status_code != 202]
            for r in refused:
                assert r.json()["error"]["vm"] == "vm0", r.text
            task = TaskOut.model_validate(accepted[0].json())
            while task.state.active:
                await asyncio.sleep(0.01)
                task = TaskOut.model_validate((await c.get(f"/v1/tasks/{task.id}")).json())
            return [r.status_code for r in answers], task

    codes, task = asyncio.run(main())
    assert sorted(codes) == [202] + [409] * 19
    assert task.state == TaskState.SUCCEEDED, task.error
    assert world.running_copies("vm0") == ["h2"]
    # A manager without a cluster CA is an insecure cluster: its reports say so.
    assert task.result is not None and task.result.tls is False


def test_at_most_four_migrations_involve_a_host_at_once(db_url: str) -> None:
    world, url = _world(db_url, 6)
    db = Database(url)
    runner = TaskRunner(db, Inventory(db, world.connector()), per_host=4)

    async def main() -> list[TaskOut]:
        tasks = [await runner.submit_migration(f"vm{i}", MigrateRequest(to="h2")) for i in range(6)]
        for _ in range(2000):
            if not any(runner.get(t.id).state.active for t in tasks):
                break
            await asyncio.sleep(0.01)
        return [runner.get(t.id) for t in tasks]

    done = asyncio.run(main())
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 6, [t.error for t in done]
    # As the agents saw it: the limit was reached and never passed, on either end.
    assert world.max_active_per_host == {"h1": 4, "h2": 4}
    with db.session() as s:
        assert {v.host.name for v in s.query(Vm)} == {"h2"}
    assert all(world.running_copies(f"vm{i}") == ["h2"] for i in range(6))


def test_force_delete_forgets_a_vm_its_host_no_longer_has(db_url: str) -> None:
    world, url = _world(db_url, 3)
    # vm0 vanished from its host behind the manager's back; vm2 was moved to h2 behind it;
    # vm1 is where the manager thinks.
    del world.vms["h1"]["vm0"]
    world.vms["h2"]["vm2"] = world.vms["h1"].pop("vm2")
    app = create_app(url, TOKEN, agents=world.connector())

    async def main() -> tuple[list[int], list[str]]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://manager", headers=headers
        ) as c:
            codes = [
                (await c.delete("/v1/vms/vm0")).status_code,
                (await c.delete("/v1/vms/vm0", params={"force": "true"})).status_code,
                (await c.get("/v1/vms/vm0")).status_code,
                # Running elsewhere: never forgotten (its address would be handed out again).
                (await c.delete("/v1/vms/vm2", params={"force": "true"})).status_code,
            ]
            names = [v["name"] for v in (await c.get("/v1/vms")).json()]
            return codes, names

    codes, names = asyncio.run(main())
    # Without --force the missing VM is reported; with it the record goes. The other stays.
    assert codes == [404, 204, 404, 409]
    assert sorted(names) == ["vm1", "vm2"]
    assert world.running_copies("vm1") == ["h1"]
    assert world.running_copies("vm2") == ["h2"]


def test_at_most_four_migrations_involve_a_destination_at_once(db_url: str) -> None:
    """Issue 22: moves into one host from several sources (three VMs on each of h1, h2 and
    h3, all to h4): the destination's slots are what limits them, and they hold. (Every move
    h1 -> h2 would not notice a missing destination slot: the source's limits both ends.)"""
    db = Database(db_url)
    world = World(hosts=("h1", "h2", "h3", "h4"), polls_to_complete=6, duration_s=0.4)
    world.register_hosts(db)
    names = [f"vm{h}{i}" for h in (1, 2, 3) for i in range(3)]
    for name in names:
        world.add_running_vm(db, name, f"h{name[2]}")
    runner = TaskRunner(db, Inventory(db, world.connector()), per_host=4)

    async def main() -> list[TaskOut]:
        tasks = [await runner.submit_migration(n, MigrateRequest(to="h4")) for n in names]
        for _ in range(3000):
            if not any(runner.get(t.id).state.active for t in tasks):
                break
            await asyncio.sleep(0.01)
        return [runner.get(t.id) for t in tasks]

    done = asyncio.run(main())
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * len(names), [t.error for t in done]
    # As the agents saw it: h4 reached the limit and never passed it.
    assert world.max_active_per_host["h4"] == 4, world.max_active_per_host
    assert all(world.running_copies(n) == ["h4"] for n in names)
    with db.session() as s:
        assert {v.host.name for v in s.query(Vm)} == {"h4"}


def test_a_high_priority_move_overtakes_the_normal_ones_waiting_for_its_host(
    db_url: str,
) -> None:
    world, url = _world(db_url, 4)
    db = Database(url)
    runner = TaskRunner(db, Inventory(db, world.connector()), per_host=1)

    async def main() -> list[TaskOut]:
        running = await runner.submit_migration("vm0", MigrateRequest(to="h2"))
        waiting = [await runner.submit_migration(f"vm{i}", MigrateRequest(to="h2")) for i in (1, 2)]
        urgent = await runner.submit_migration("vm3", MigrateRequest(to="h2", priority="high"))
        tasks = [running, *waiting, urgent]
        for _ in range(3000):
            if not any(runner.get(t.id).state.active for t in tasks):
                break
            await asyncio.sleep(0.01)
        return [runner.get(t.id) for t in tasks]

    done = asyncio.run(main())
    assert [t.state for t in done] == [TaskState.SUCCEEDED] * 4, [t.error for t in done]
    started = {t.vm: t.started_at for t in done}
    assert all(started.values())
    order = sorted(started, key=lambda vm: started[vm])  # type: ignore[arg-type, return-value]
    # The one running kept its slot; the high one went next, before those that waited first.
    assert order == ["vm0", "vm3", "vm1", "vm2"], started
    assert world.max_active_per_host == {"h1": 1, "h2": 1}
    assert all(world.running_copies(f"vm{i}") == ["h2"] for i in range(4))


def test_a_move_cancelled_while_queued_ends_at_once_not_when_a_slot_frees(
    db_url: str,
) -> None:
    world, url = _world(db_url, 2)
    world.polls_to_complete = 200  # the running move holds the hosts' only slots a while
    db = Database(url)
    runner = TaskRunner(db, Inventory(db, world.connector()), per_host=1)

    async def main() -> tuple[TaskOut, TaskOut, TaskOut]:
        running = await runner.submit_migration("vm0", MigrateRequest(to="h2"))
        queued = await runner.submit_migration("vm1", MigrateRequest(to="h2"))
        await asyncio.sleep(0.2)
        runner.cancel(queued.id)
        for _ in range(100):
            if not runner.get(queued.id).state.active:
                break
            await asyncio.sleep(0.01)
        ended, meanwhile = runner.get(queued.id), runner.get(running.id)
        runner.cancel(running.id)
        for _ in range(3000):
            if not runner.get(running.id).state.active:
                break
            await asyncio.sleep(0.01)
        return ended, meanwhile, runner.get(running.id)

    ended, meanwhile, running = asyncio.run(main())
    assert ended.state == TaskState.CANCELLED and ended.error == "cancelled while queued"
    assert meanwhile.state == TaskState.RUNNING  # it did not wait for this one to end
    assert not running.state.active
    assert world.running_copies("vm1") == ["h1"]
    assert len(world.running_copies("vm0")) == 1
