"""DRS acting on the manager over scripted agents: maintenance, rules, recommendations, placement.

The manager is the real app (inventory, task runner, operations) and its agents are the
in-process world (tests/unit/agent_world/), whose migrations end with the VM running on
exactly one host; every outcome is read back from the world, not from the manager's word.
"""

from __future__ import annotations

from typing import Any

from qmotion.api.server import TaskState
from qmotion.server.db import Database, Recommendation, Vm
from tests.unit.agent_world import World
from tests.unit.manager_app import Client
from tests.unit.manager_app import run_manager as _run
from tests.unit.manager_app import wait_task as _wait

GIB = 1 << 30


def _cluster(
    db_url: str,
    placement: dict[str, list[tuple[str, int]]],
    memory_gib: dict[str, int] | None = None,
) -> tuple[World, str]:
    """Hosts h1..h3 (8 GiB, 4 CPUs unless given) with VMs ``{host: [(name, MiB)]}``."""
    url = db_url
    db = Database(url)
    world = World(hosts=("h1", "h2", "h3"), polls_to_complete=2)
    for h in world.hosts:
        world.facts_override[h] = {"cpus": 4, "memory_bytes": (memory_gib or {}).get(h, 8) * GIB}
    world.register_hosts(db)
    for host, vms in placement.items():
        for name, mib in vms:
            world.add_running_vm(db, name, host, memory_mib=mib)
    db.engine.dispose()
    return world, url


def _where(world: World) -> dict[str, str]:
    """Each VM's one running copy, from the agents (fails if a VM runs twice or nowhere)."""
    out: dict[str, str] = {}
    for name in {n for vms in world.vms.values() for n in vms}:
        copies = world.running_copies(name)
        assert len(copies) == 1, (name, copies)
        out[name] = copies[0]
    return out


async def _host(c: Client, name: str) -> dict[str, Any]:
    hosts = (await c.get("/v1/hosts")).json()
    found: dict[str, Any] = next(h for h in hosts if h["name"] == name)
    return found


def test_maintenance_spreads_six_vms_refuses_new_ones_and_returns_them(db_url: str) -> None:
    six = [(f"vm{i}", 1024) for i in range(6)]
    world, url = _cluster(db_url, {"h1": six, "h2": [("other", 1024)]})

    async def test(c: Client) -> None:
        r = await c.post("/v1/hosts/h1/maintenance")
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "entering-maintenance"
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        where = _where(world)
        assert not [v for v, h in where.items() if h == "h1"]
        per_host = {h: sum(1 for x in where.values() if x == h) for h in ("h2", "h3")}
        # Spread evenly (the hosts' CPU and memory loads), never all on one host.
        assert per_host == {"h2": 4, "h3": 3}, per_host
        assert task.operation is not None and task.operation.spread == {"h2": 3, "h3": 3}
        assert {m.vm for m in task.operation.moves if m.outcome == "moved"} == {v for v, _ in six}
        assert (await _host(c, "h1"))["state"] == "maintenance"

        # The host takes no new VM: not created there, not migrated there, not placed there.
        r = await c.post("/v1/vms", json={"name": "new", "host": "h1", "memory": "256M"})
        assert r.status_code == 409, r.text
        r = await c.post("/v1/vms/other/migrate", json={"to": "h1"})
        assert r.status_code == 409 and "maintenance" in r.json()["error"]["message"], r.text
        ranked = (await c.post("/v1/drs/place", json={"memory": "256M"})).json()
        assert [x["host"] for x in ranked if not x["feasible"]] == ["h1"]

        r = await c.post("/v1/hosts/h1/maintenance/exit", json={"return_vms": True})
        assert r.status_code == 200, r.text
        back = await _wait(c, r.json()["task_id"])
        assert back.state == TaskState.SUCCEEDED, back.error
        where = _where(world)
        assert {v for v, h in where.items() if h == "h1"} == {v for v, _ in six}
        assert where["other"] == "h2"
        assert (await _host(c, "h1"))["state"] == "up"

    _run(world, url, test)


def test_maintenance_that_cannot_finish_says_why_and_exit_is_possible(db_url: str) -> None:
    # h2 and h3 have 2 GiB: the 3 GiB VM fits nowhere else; the small one leaves.
    world, url = _cluster(
        db_url,
        {"h1": [("big", 3072), ("small", 512)]},
        memory_gib={"h1": 8, "h2": 2, "h3": 2},
    )

    async def test(c: Client) -> None:
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.FAILED
        assert task.error is not None and "big" in task.error
        host = await _host(c, "h1")
        assert host["state"] == "entering-maintenance"
        assert "big" in host["maintenance_reason"]
        where = _where(world)
        assert where["big"] == "h1" and where["small"] in ("h2", "h3")
        r = await c.post("/v1/hosts/h1/maintenance/exit")
        assert r.status_code == 200 and r.json()["state"] == "up", r.text
        assert (await _host(c, "h1"))["maintenance_reason"] is None

    _run(world, url, test)


def test_anti_affinity_holds_through_maintenance_and_refuses_a_manual_move(
    db_url: str,
) -> None:
    # Without the rule, a would go to h3 (the emptiest host), where b is.
    world, url = _cluster(
        db_url, {"h1": [("a", 1024)], "h2": [("c", 1024), ("d", 1024)], "h3": [("b", 1024)]}
    )

    async def test(c: Client) -> None:
        rule = {"name": "apart", "kind": "anti-affinity", "vms": ["a", "b"], "strength": "must"}
        r = await c.post("/v1/rules", json=rule)
        assert r.status_code == 201, r.text
        assert r.json()["broken_by"] == []
        # Manual: refused naming the rule, nothing started; --force goes ahead.
        r = await c.post("/v1/vms/a/migrate", json={"to": "h3"})
        assert r.status_code == 409 and "apart" in r.json()["error"]["message"], r.text
        assert (await c.get("/v1/tasks")).json() == []
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert _where(world)["a"] == "h2"
        # Now h2 too: a may go neither to h1 (maintenance) nor to h3 (b): it stays, and the
        # host says which VM holds it.
        r = await c.post("/v1/hosts/h2/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.FAILED
        assert _where(world)["a"] == "h2" and _where(world)["c"] == "h3"
        assert "a:" in (await _host(c, "h2"))["maintenance_reason"]
        r = await c.post("/v1/hosts/h2/maintenance/exit")
        assert r.status_code == 200 and r.json()["state"] == "up", r.text
        r = await c.post("/v1/vms/a/migrate", json={"to": "h3", "force": True})
        assert r.status_code == 202, r.text
        assert (await _wait(c, r.json()["id"])).state == TaskState.SUCCEEDED
        assert _where(world)["a"] == "h3"
        rules = (await c.get("/v1/rules")).json()
        assert rules[0]["broken_by"] == ["a", "b"]

    _run(world, url, test)


def test_rule_list_names_the_vms_breaking_a_should_rule_too(db_url: str) -> None:
    """Issue 23: ``broken_by`` was computed for must rules only, so a broken should rule
    read as kept in ``rule list``."""
    world, url = _cluster(db_url, {"h1": [("a", 1024), ("b", 1024)], "h2": [("c", 1024)]})

    async def test(c: Client) -> None:
        for strength in ("should", "must"):
            rule = {"name": f"apart-{strength}", "kind": "anti-affinity", "vms": ["a", "b"]}
            r = await c.post("/v1/rules", json={**rule, "strength": strength})
            assert r.status_code == 201, r.text
            assert r.json()["broken_by"] == ["a", "b"], r.text
        together = {"name": "together", "kind": "affinity", "vms": ["a", "b"]}
        r = await c.post("/v1/rules", json={**together, "strength": "should"})
        assert r.json()["broken_by"] == [], r.text

    _run(world, url, test)


def test_a_must_affinity_group_is_evacuated_together(db_url: str) -> None:
    # Five together: more than a host's four concurrent migrations, so they span waves.
    group = [f"g{i}" for i in range(5)]
    world, url = _cluster(
        db_url,
        {"h1": [*((g, 512) for g in group), ("solo", 1024)], "h2": [("x", 2048)]},
    )

    async def test(c: Client) -> None:
        rule = {"name": "pack", "kind": "affinity", "vms": group}
        assert (await c.post("/v1/rules", json=rule)).status_code == 201
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        where = _where(world)
        assert len({where[g] for g in group}) == 1 and where["g0"] != "h1", where
        assert where["solo"] != "h1"
        assert (await c.get("/v1/rules/pack")).json()["broken_by"] == []

    _run(world, url, test)


def test_rules_are_validated_and_contradictions_refused_naming_both(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [("a", 512), ("b", 512)]})

    async def test(c: Client) -> None:
        ok = {"name": "together", "kind": "affinity", "vms": ["a", "b"]}
        assert (await c.post("/v1/rules", json=ok)).status_code == 201
        bad = {"name": "apart", "kind": "anti-affinity", "vms": ["b", "a"]}
        r = await c.post("/v1/rules", json=bad)
        assert r.status_code == 409, r.text
        message = r.json()["error"]["message"]
        assert "together" in message and "apart" in message
        pinned = {"name": "pin", "kind": "run-on", "vms": ["a"], "hosts": ["h9"]}
        r = await c.post("/v1/rules", json=pinned)
        assert r.status_code == 422 and r.json()["error"]["field"] == "hosts", r.text
        nowhere = [
            {"name": "on1", "kind": "run-on", "vms": ["x"], "hosts": ["h1"]},
            {"name": "off1", "kind": "not-run-on", "vms": ["x"], "hosts": ["h1"]},
        ]
        assert (await c.post("/v1/rules", json=nowhere[0])).status_code == 201
        r = await c.post("/v1/rules", json=nowhere[1])
        assert r.status_code == 409 and "on1" in r.text and "off1" in r.text, r.text
        # A rule may name a VM before it exists; creating it elsewhere is then refused.
        r = await c.post("/v1/vms", json={"name": "x", "host": "h2", "memory": "256M"})
        assert r.status_code == 409 and "on1" in r.json()["error"]["message"], r.text
        chained = [
            {"name": "c1", "kind": "affinity", "vms": ["a", "m"]},
            {"name": "c2", "kind": "anti-affinity", "vms": ["b", "m"]},
        ]
        assert (await c.post("/v1/rules", json=chained[0])).status_code == 201
        r = await c.post("/v1/rules", json=chained[1])  # b with a (together), m with a too
        assert r.status_code == 409 and "c2" in r.text and "together" in r.text, r.text
        cramped = [
            {"name": "both-on-h2", "kind": "run-on", "vms": ["p", "q"], "hosts": ["h2"]},
            {"name": "pq-apart", "kind": "anti-affinity", "vms": ["p", "q"]},
        ]
        assert (await c.post("/v1/rules", json=cramped[0])).status_code == 201
        r = await c.post("/v1/rules", json=cramped[1])
        assert r.status_code == 409 and "both-on-h2" in r.text and "pq-apart" in r.text, r.text
        single = {"name": "lonely", "kind": "affinity", "vms": ["a"]}
        r = await c.post("/v1/rules", json=single)
        assert r.status_code == 422, r.text
        assert (await c.delete("/v1/rules/together")).status_code == 204
        assert (await c.get("/v1/rules/together")).status_code == 404

    _run(world, url, test)


def test_drs_balances_measured_load_then_stops(db_url: str) -> None:
    # Allocation is even (two 512 MiB VMs per host); only the measured CPU is not.
    world, url = _cluster(
        db_url,
        {
            "h1": [("hot1", 512), ("hot2", 512)],
            "h2": [("c1", 512), ("c2", 512)],
            "h3": [("c3", 512), ("c4", 512)],
        },
    )
    world.cpu_percent.update({"hot1": 300.0, "hot2": 300.0})  # 3 of 4 CPUs each

    async def test(c: Client) -> None:
        settings = {"drs.automation": "full", "drs.threshold": "3", "drs.cooldown": "0s"}
        r = await c.put("/v1/cluster/settings", json={"values": settings})
        assert r.status_code == 200 and r.json()["automation"] == "full", r.text
        r = await c.put("/v1/cluster/settings", json={"values": {"drs.threshold": "9"}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "drs.threshold", r.text
        idle = (await c.post("/v1/drs/run")).json()
        assert idle["recommendations"] == []  # by allocation alone, nothing to do
        await c.post("/v1/hosts/refresh")  # the agents' usage samples
        run = (await c.post("/v1/drs/run")).json()
        assert run["measured_vms"] == 6
        assert run["recommendations"] and run["applied_task"] is not None
        task = await _wait(c, run["applied_task"])
        assert task.state == TaskState.SUCCEEDED, task.error
        where = _where(world)
        assert where["hot1"] != where["hot2"], where
        recs = (await c.get("/v1/drs/recommendations", params={"all": True})).json()
        assert {r["state"] for r in recs} == {"applied"}
        # Balanced: the next two runs move nothing (no cool-down holds anything).
        for _ in range(2):
            await c.post("/v1/hosts/refresh")
            again = (await c.post("/v1/drs/run")).json()
            assert again["recommendations"] == [] and again["applied_task"] is None, again
        assert _where(world) == where

    _run(world, url, test)


def test_a_restart_during_an_apply_does_not_stop_automation(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [(f"v{i}", 512) for i in range(4)]})
    db = Database(url)
    with db.session() as s:
        s.add(
            Recommendation(
                run_id=1,
                vm="v0",
                source="h1",
                target="h2",
                priority=3,
                reason="balance",
                gain=0.1,
                wave=0,
                state="applying",
            )
        )
    db.engine.dispose()

    async def test(c: Client) -> None:
        recs = (await c.get("/v1/drs/recommendations", params={"all": True})).json()
        assert [r["state"] for r in recs] == ["failed"]
        run = (await c.post("/v1/drs/run")).json()
        assert run["recommendations"]

    _run(world, url, test, lifespan=True)


def test_manual_automation_only_recommends_and_apply_rechecks(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [(f"v{i}", 512) for i in range(4)]})

    async def test(c: Client) -> None:
        run = (await c.post("/v1/drs/run")).json()
        assert run["automation"] == "partial" and run["applied_task"] is None
        recs = run["recommendations"]
        assert recs and _where(world) == dict.fromkeys(_where(world), "h1")
        # One VM moved by hand meanwhile: its recommendation is stale and skipped.
        first = recs[0]
        r = await c.post(f"/v1/vms/{first['vm']}/migrate", json={"to": first["target"]})
        await _wait(c, r.json()["id"])
        r = await c.post("/v1/drs/apply", json={"all": True})
        assert r.status_code == 202, r.text
        task = await _wait(c, r.json()["id"])
        assert task.operation is not None
        outcome = {m.vm: m.outcome for m in task.operation.moves}
        assert outcome[first["vm"]] == "skipped"
        assert all(outcome[x["vm"]] == "moved" for x in recs[1:])
        r = await c.post("/v1/drs/apply", json={"ids": [first["id"]]})
        assert r.status_code == 409, r.text  # no longer pending

    _run(world, url, test)


def test_placement_keeps_rules_that_name_the_vm_before_it_exists(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [("a", 512)], "h2": [("b", 512)]})

    async def test(c: Client) -> None:
        # h3 is empty and would be chosen; the rules say otherwise.
        rules = [
            {"name": "not-h3", "kind": "not-run-on", "vms": ["new"], "hosts": ["h3"]},
            {"name": "away-from-a", "kind": "anti-affinity", "vms": ["new", "a"]},
        ]
        for rule in rules:
            assert (await c.post("/v1/rules", json=rule)).status_code == 201
        r = await c.post("/v1/vms", json={"name": "new", "memory": "512M"})
        assert r.status_code == 201, r.text
        assert r.json()["host"] == "h2"
        refused = {x["host"]: x for x in r.json()["placement"]["candidates"] if not x["feasible"]}
        assert set(refused) == {"h1", "h3"}
        assert "away-from-a" in " ".join(refused["h1"]["reasons"])

    _run(world, url, test)


def test_placement_picks_a_host_and_says_why(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [("a", 4096)], "h2": [("b", 1024)]}, memory_gib={"h3": 1})

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms", json={"name": "fresh", "memory": "1G"})
        assert r.status_code == 201, r.text
        out = r.json()
        # h3 has no room for 1 GiB beyond its reservation; h2 is the less loaded of the rest.
        assert out["host"] == "h2" and out["placement"]["chosen_by"] == "drs"
        refused = [x for x in out["placement"]["candidates"] if not x["feasible"]]
        assert [x["host"] for x in refused] == ["h3"] and "MiB" in refused[0]["reasons"][0]
        assert "fresh" in world.vms["h2"]
        # Manual automation only recommends a host.
        manual = {"values": {"drs.automation": "manual"}}
        assert (await c.put("/v1/cluster/settings", json=manual)).status_code == 200
        r = await c.post("/v1/vms", json={"name": "later", "memory": "1G"})
        assert r.status_code == 409 and "recommended: h2" in r.json()["error"]["message"]
        assert "later" not in world.vms["h2"]
        r = await c.post("/v1/vms", json={"name": "huge", "memory": "64G"})
        assert r.status_code == 409 and r.json()["error"]["field"] == "host", r.text
        r = await c.post("/v1/vms", json={"name": "huge", "host": "h1", "memory": "8G"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "insufficient_memory"

    _run(world, url, test)


def test_overcommitted_hosts_still_balance_measured_load(db_url: str) -> None:
    """One CPU per host, nine 1-vCPU VMs (the lab's shape): the even-allocation term must
    not outweigh two busy VMs sharing a host while another idles with four (measured in the
    lab: a move of a busy VM there adds more vCPU unevenness than its demand gain)."""
    placement = {
        "h1": [("busy1", 256), ("busy2", 256)],
        "h2": [(f"idle{i}", 256) for i in range(4)],
        "h3": [("busy3", 256), ("idle4", 256), ("idle5", 256)],
    }
    world, url = _cluster(db_url, placement)
    for h in world.hosts:
        world.facts_override[h]["cpus"] = 1
    busy = ["busy1", "busy2", "busy3"]
    world.cpu_percent.update({f"idle{i}": 3.0 for i in range(6)})  # an idle guest's ticks
    world.cpu_percent.update(dict.fromkeys(busy, 40.0))

    async def test(c: Client) -> None:
        await c.put("/v1/cluster/settings", json={"values": {"drs.automation": "full"}})
        await c.post("/v1/hosts/refresh")
        run = (await c.post("/v1/drs/run")).json()
        assert run["applied_task"] is not None, run
        task = await _wait(c, run["applied_task"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert len({_where(world)[b] for b in busy}) == 3, _where(world)

    _run(world, url, test)


def test_proactive_evacuation_of_a_degraded_host(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [("a", 512), ("b", 512)], "h2": [("c", 512)]})
    world.facts_override["h1"].update(
        {"health": "degraded", "health_reasons": ["datastore local: not writable"]}
    )

    async def test(c: Client) -> None:
        await c.post("/v1/hosts/refresh")
        # Off (the default): the report is shown, nothing moves for it.
        run = (await c.post("/v1/drs/run")).json()
        assert all(r["source"] != "h1" or r["priority"] > 2 for r in run["recommendations"])
        host = await _host(c, "h1")
        assert host["facts"]["health_reasons"] == ["datastore local: not writable"]
        settings = {"drs.proactive": "true", "drs.automation": "full"}
        assert (await c.put("/v1/cluster/settings", json={"values": settings})).status_code == 200
        run = (await c.post("/v1/drs/run")).json()
        assert {r["vm"] for r in run["recommendations"] if r["priority"] <= 2} == {"a", "b"}
        task = await _wait(c, run["applied_task"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert [v for v, h in _where(world).items() if h == "h1"] == []
        ranked = (await c.post("/v1/drs/place", json={"memory": "256M"})).json()
        assert [x["host"] for x in ranked if not x["feasible"]] == ["h1"]

    _run(world, url, test)


def test_maintenance_moves_a_stopped_vms_definition_too(db_url: str) -> None:
    world, url = _cluster(db_url, {"h1": [("up", 512)]})
    db = Database(url)
    world.add_running_vm(db, "off", "h1", memory_mib=512)
    world.vms["h1"]["off"].runstate = "gone"  # defined, no QEMU
    with db.session() as s:
        s.query(Vm).filter_by(name="off").one().state = "stopped"
    db.engine.dispose()

    async def test(c: Client) -> None:
        r = await c.post("/v1/hosts/h1/maintenance")
        task = await _wait(c, r.json()["task_id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        vms = {v["name"]: v for v in (await c.get("/v1/vms")).json()}
        assert vms["off"]["host"] != "h1" and vms["off"]["state"] == "stopped"
        assert "off" not in world.vms["h1"] and "off" in world.vms[vms["off"]["host"]]

    _run(world, url, test)
