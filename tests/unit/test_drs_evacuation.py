"""Evacuations that finish and DRS moves that converge, on the real manager over scripted agents
(issue 23): a VM already migrating out, a manager restart mid-evacuation then ``exit --return``,
a split must-affinity group, a target that fails, a VM dirtying faster than its link, and a
failed DRS move backing off.

Every outcome is read back from the agents (where each VM runs), not from the manager's word.
"""

from __future__ import annotations

import asyncio

from qmotion.api.migration import MigrationPhase, MigrationReport
from qmotion.api.server import TaskState
from qmotion.server.db import Database, Task
from tests.unit.agent_world import World
from tests.unit.manager_app import Client
from tests.unit.manager_app import run_manager as _run
from tests.unit.manager_app import wait_task as _wait
from tests.unit.test_drs_manager import _cluster, _host, _where

INCOMING = ("POST", "/v1/migrations/incoming")


async def _until(check: object, what: str, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def _maintained(c: Client, host: str) -> None:
    """Until the host is in maintenance (the evacuation task may be a resumed one)."""

    async def done() -> bool:
        return bool((await _host(c, host))["state"] == "maintenance")

    await _until(done, f"{host} in maintenance")


async def _exit_with_return(c: Client, world: World, host: str) -> dict[str, str]:
    r = await c.post(f"/v1/hosts/{host}/maintenance/exit", json={"return_vms": True})
    assert r.status_code == 200, r.text
    task = await _wait(c, r.json()["task_id"])
    assert task.state == TaskState.SUCCEEDED, task.error
    return _where(world)


def _stop_mid_evacuation(world: World, url: str, host: str) -> None:
    """A manager that starts evacuating ``host`` and stops (its lifespan ends) while a move
    is copying: the moves go on in the agents."""

    async def first(c: Client) -> None:
        r = await c.post(f"/v1/hosts/{host}/maintenance")
        assert r.status_code == 202, r.text

        async def moving() -> bool:
            tasks = (await c.get("/v1/tasks")).json()
            return any(t["kind"] == "migrate" and t["phase"] == "monitor" for t in tasks)

        await _until(moving, "an evacuation move copying")

    _run(world, url, first, lifespan=True)
    db = Database(url)
    with db.session() as s:
        running = s.query(Task).filter(Task.kind == "migrate", Task.state == "running").count()
    db.engine.dispose()
    assert running  # the restart really happens mid-evacuation


def test_a_vm_migrating_out_when_maintenance_starts_is_awaited_and_comes_back(
    db_url: str,
) -> None:
    """It was pinned to the host as "migrating", came back "no feasible host", the
    evacuation failed and the host stayed entering-maintenance once empty."""
    world, url = _cluster(db_url, {"h1": [("mover", 512)], "h2": [("other", 512)]})
    world.polls_to_complete = 12  # long enough that the evacuation starts meanwhile

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/mover/migrate", json={"to": "h2"})
        assert r.status_code == 202, r.text
        manual = r.json()["id"]
        r = await c.post("/v1/hosts/h1/maintenance")
        assert r.status_code == 202, r.text
        assert (await c.get(f"/v1/tasks/{manual}")).json()["state"] == "running"
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert (await _host(c, "h1"))["state"] == "maintenance"
        where = _where(world)
        assert where == {"mover": "h2", "other": "h2"}, where
        # It left while the host was being evacuated: `exit --return` brings it back too.
        back = await _exit_with_return(c, world, "h1")
        assert back == {"mover": "h1", "other": "h2"}, back

    _run(world, url, test)


def test_a_restart_mid_evacuation_resumes_it_and_exit_return_brings_every_vm_back(
    db_url: str,
) -> None:
    """The moves the first manager started finish under the second, which resumed the
    evacuation; they were not recorded as evacuated, so `exit --return` left them away."""
    vms = [(f"v{i}", 512) for i in range(4)]
    world, url = _cluster(db_url, {"h1": vms})
    world.polls_to_complete = 10

    _stop_mid_evacuation(world, url, "h1")

    async def second(c: Client) -> None:
        await _maintained(c, "h1")
        where = _where(world)
        assert "h1" not in where.values(), where
        assert await _exit_with_return(c, world, "h1") == {v: "h1" for v, _ in vms}

    _run(world, url, second, lifespan=True)


def test_a_split_must_group_leaves_together_when_its_host_enters_maintenance(
    db_url: str,
) -> None:
    """a on h1, b on h2 (busy), must affinity [a, b]: the group is planned to h3, and the
    evacuation kept only a's move (its source is h1), which the re-check refused three rounds:
    b's move is part of the evacuation."""
    world, url = _cluster(
        db_url,
        {"h1": [("a", 512)], "h2": [("b", 512), ("x1", 512), ("x2", 512)], "h3": [("c", 512)]},
    )
    world.cpu_percent.update({"x1": 300.0, "x2": 300.0})  # h2 is busy: the group goes to h3

    async def test(c: Client) -> None:
        await c.post("/v1/hosts/refresh")
        rule = {"name": "pair", "kind": "affinity", "strength": "must", "vms": ["a", "b"]}
        r = await c.post("/v1/rules", json=rule)
        assert r.status_code == 201, r.text
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        where = _where(world)
        assert where["a"] == where["b"] != "h1", where
        assert (await _host(c, "h1"))["state"] == "maintenance"

    _run(world, url, test)


def test_a_failed_target_is_not_tried_again_while_another_host_is_free(db_url: str) -> None:
    """The evacuation planned the same target three rounds running."""
    world, url = _cluster(
        db_url,
        {"h1": [("v", 512)], "h3": [("busy", 2048)]},
    )
    world.cpu_percent["busy"] = 300.0
    world.fail_always[("h2", *INCOMING)] = 500  # h2 takes no migration in

    async def test(c: Client) -> None:
        await c.post("/v1/hosts/refresh")
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert task.operation is not None
        tried = [(m.target, m.outcome) for m in task.operation.moves]
        assert tried == [("h2", "failed"), ("h3", "moved")], tried
        assert _where(world)["v"] == "h3"

    _run(world, url, test)


def _past_migration(url: str, source: str, destination: str, mbps: float) -> None:
    """What an earlier migration on this path carried: the link DRS learns."""
    db = Database(url)
    with db.session() as s:
        report = MigrationReport(
            outcome=MigrationPhase.DONE,
            vm="gone",
            source=source,
            destination=destination,
            throughput_mbps=mbps,
            wall_ms=1000,
        )
        s.add(
            Task(
                kind="migrate",
                state="succeeded",
                vm=None,
                source=source,
                destination=destination,
                result=report.model_dump(mode="json"),
            )
        )
    db.engine.dispose()


def test_a_vm_dirtying_faster_than_its_link_is_left_and_the_others_balance(
    db_url: str,
) -> None:
    """It was the best move by the load (the busiest VM on the busiest host), a priority-2
    recommendation that full automation applied: a migration that throttles the guest or
    never ends, for a gain in balance."""
    world, url = _cluster(
        db_url,
        {"h1": [("writer", 512), ("hot1", 512), ("hot2", 512)], "h2": [], "h3": []},
    )
    world.cpu_percent.update({"writer": 380.0, "hot1": 250.0, "hot2": 250.0})
    world.dirty_rate["writer"] = 400.0  # MiB/s
    for dst in ("h2", "h3"):
        _past_migration(url, "h1", dst, mbps=800.0)  # ~95 MiB/s

    async def test(c: Client) -> None:
        settings = {"drs.automation": "full", "drs.threshold": "3", "drs.cooldown": "0s"}
        r = await c.put("/v1/cluster/settings", json={"values": settings})
        assert r.status_code == 200, r.text
        await c.post("/v1/hosts/refresh")
        run = (await c.post("/v1/drs/run")).json()
        moved = {x["vm"] for x in run["recommendations"]}
        assert moved and "writer" not in moved, run
        left = {x["vm"]: x["reason"] for x in run["left"]}
        assert "400 MiB/s" in left["writer"] and "95 MiB/s" in left["writer"], left
        task = await _wait(c, run["applied_task"])
        assert task.state == TaskState.SUCCEEDED, task.error
        where = _where(world)
        assert where["writer"] == "h1" and where["hot1"] != where["hot2"], where

    _run(world, url, test)


def test_a_failed_drs_move_backs_off_and_says_until_when(db_url: str) -> None:
    """Failed moves were planned again every interval."""
    world, url = _cluster(db_url, {"h1": [("a", 512), ("b", 512)], "h3": [("c", 2048)]})
    world.cpu_percent.update({"a": 300.0, "b": 300.0, "c": 300.0})
    world.fail_always[("h2", *INCOMING)] = 500

    async def test(c: Client) -> None:
        settings = {"drs.automation": "partial", "drs.threshold": "3", "drs.cooldown": "0s"}
        await c.put("/v1/cluster/settings", json={"values": settings})
        await c.post("/v1/hosts/refresh")
        run = (await c.post("/v1/drs/run")).json()
        first = [(x["vm"], x["target"]) for x in run["recommendations"]]
        assert "h2" in {t for _, t in first}, run
        r = await c.post("/v1/drs/apply", json={"all": True})
        task = await _wait(c, r.json()["id"])
        assert task.state == TaskState.FAILED
        failed = [(m.vm, m.target) for m in task.operation.moves if m.outcome == "failed"]  # type: ignore[union-attr]
        assert failed and all(t == "h2" for _, t in failed), failed
        again = (await c.post("/v1/drs/run")).json()
        assert not {(x["vm"], x["target"]) for x in again["recommendations"]} & set(failed)
        waiting = {x["vm"]: x["reason"] for x in again["left"]}
        for vm, _ in failed:
            assert "failed once" in waiting[vm] and "backing off until" in waiting[vm], waiting
        recs = (await c.get("/v1/drs/recommendations", params={"all": True})).json()
        retry = [x["retry_after"] for x in recs if x["state"] == "failed"]
        assert retry and all(retry), recs

    _run(world, url, test)


def test_exit_return_right_after_a_restart_mid_evacuation_brings_every_vm_back(
    db_url: str,
) -> None:
    """The exit cancels the resumed evacuation while the first manager's moves are still
    under way: they were neither awaited nor recorded, so they stayed away."""
    vms = [(f"v{i}", 512) for i in range(4)]
    world, url = _cluster(db_url, {"h1": vms})
    world.polls_to_complete = 10

    _stop_mid_evacuation(world, url, "h1")
    world.polls_to_complete = 60  # the moves are still under way when the exit comes

    async def second(c: Client) -> None:
        tasks = (await c.get("/v1/tasks")).json()
        assert any(t["kind"] == "migrate" and t["state"] == "running" for t in tasks)
        # The exit comes while the first manager's moves still copy (they resume).
        assert await _exit_with_return(c, world, "h1") == {v: "h1" for v, _ in vms}
        assert (await _host(c, "h1"))["state"] == "up"

    _run(world, url, second, lifespan=True)
