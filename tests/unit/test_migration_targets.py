"""The Migrate wizard's targets: the ranking equals `drs place`'s, and the manager's verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmotion.api.drs import MigrationTarget
from qmotion.api.vm import Disk
from qmotion.drs.model import Policy, Snapshot
from qmotion.drs.placement import Candidate, load_after_move, place, rank_moves
from qmotion.drs.rules import broken_by_move
from qmotion.server.db import Database, Host, Vm
from tests.unit.agent_world import World
from tests.unit.drs_snapshots import GROUP_SENT_HOME, PARTNER_MOVED_ALREADY, SHOULD_AFTER_ROOM
from tests.unit.manager_app import Client, run_manager
from tests.unit.test_drs_properties import clusters, make

GIB = 1 << 30

# ---------------------------------------------------------------------- the ranking (pure)


def _without(snap: Snapshot, vm: str) -> Snapshot:
    """The cluster with ``vm`` gone, and the rules naming it (a new VM is named by none)."""
    return snap.model_copy(
        update={
            "vms": [v for v in snap.vms if v.name != vm],
            "rules": [r for r in snap.rules if vm not in r.vms],
        }
    )


def _row(c: Candidate) -> tuple[str, bool, float, list[str]]:
    return (c.host, c.feasible, c.score, c.reasons)


def _check_equals_place(snap: Snapshot, vm: str, policy: Policy) -> None:
    spec = next(v for v in snap.vms if v.name == vm)
    moves = rank_moves(snap, vm, policy)
    assert sorted(c.host for c in moves) == sorted(h.name for h in snap.hosts)
    here = next(c for c in moves if c.host == spec.host)
    assert not here.feasible and here.reasons[0] == "current host"

    # Without the rules naming the VM: exactly `drs place` for it on the cluster without it,
    # order and scores to the last bit, for every host but its own.
    bare = snap.model_copy(update={"rules": [r for r in snap.rules if vm not in r.vms]})
    plain = [_row(c) for c in rank_moves(bare, vm, policy) if c.host != spec.host]
    placed = [_row(c) for c in place(_without(snap, vm), spec, policy) if c.host != spec.host]
    assert plain == placed

    # With them: the must ones it would break make a host infeasible, naming the rule.
    where = {v.name: v.host for v in snap.vms if v.name != vm}
    unruled = {c.host: c for c in rank_moves(bare, vm, policy)}
    for c in moves:
        if c.host == spec.host:
            continue
        must = broken_by_move(snap.rules, where, vm, c.host)
        for r in must:
            assert f"must rule {r.name} forbids it" in c.reasons, (c, r)
        assert c.feasible == (unruled[c.host].feasible and not must), (c, must)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(data=clusters(), pick=st.data())
def test_the_wizards_ranking_is_drs_places_without_the_vm(
    data: dict[str, Any], pick: st.DataObject
) -> None:
    snap = make(data)
    if not snap.vms:
        return
    vm = pick.draw(st.sampled_from([v.name for v in snap.vms]))
    _check_equals_place(snap, vm, Policy())


@pytest.mark.parametrize(
    "example", [SHOULD_AFTER_ROOM, PARTNER_MOVED_ALREADY, GROUP_SENT_HOME], ids=["a", "b", "c"]
)
def test_the_found_snapshots_rank_as_place_for_every_vm(example: dict[str, Any]) -> None:
    snap = Snapshot.model_validate(example)
    for v in snap.vms:
        _check_equals_place(snap, v.name, Policy())


def _three(*rules: dict[str, Any]) -> Snapshot:
    return Snapshot.model_validate(
        {
            "hosts": [
                {"name": h, "cpu_capacity": 8, "memory_mib": 16384} for h in ("h1", "h2", "h3")
            ],
            "vms": [
                {"name": "a", "host": "h1", "memory_mib": 1024},
                {"name": "b", "host": "h2", "memory_mib": 1024},
            ],
            "rules": list(rules),
        }
    )


def _by_host(snap: Snapshot, vm: str) -> dict[str, Candidate]:
    return {c.host: c for c in rank_moves(snap, vm, Policy())}


def test_a_must_rule_naming_the_vm_refuses_the_hosts_it_forbids() -> None:
    apart = _by_host(_three({"name": "apart", "kind": "anti_affinity", "vms": ["a", "b"]}), "a")
    assert not apart["h2"].feasible and "must rule apart forbids it" in apart["h2"].reasons
    assert apart["h3"].feasible
    assert apart["h1"].reasons[0] == "current host" and not apart["h1"].feasible

    # Moved alone, a must-affine VM may only join its partner (the planner moves groups).
    together = _by_host(_three({"name": "tog", "kind": "affinity", "vms": ["a", "b"]}), "a")
    assert together["h2"].feasible
    assert not together["h3"].feasible and "must rule tog forbids it" in together["h3"].reasons

    pinned = _by_host(
        _three({"name": "pin", "kind": "run_on", "vms": ["a"], "hosts": ["h1", "h3"]}), "a"
    )
    assert not pinned["h2"].feasible and "must rule pin forbids it" in pinned["h2"].reasons
    assert pinned["h3"].feasible

    # A should rule only scores: feasible, one worse.
    soft = _by_host(
        _three({"name": "s", "kind": "anti_affinity", "strength": "should", "vms": ["a", "b"]}),
        "a",
    )
    assert soft["h2"].feasible and "should rule s forbids it" in soft["h2"].reasons
    assert soft["h2"].score > soft["h3"].score


def test_the_figures_after_the_move() -> None:
    after = load_after_move(_three(), "a")
    # h2 holds b (1 GiB) and would hold a: 16 GiB less 2; a's own host keeps what it has now.
    # CPU demand: one vCPU each (none measured) over 8 cores.
    assert after == {
        "h1": (16384 - 1024, 1 / 8),
        "h2": (16384 - 2048, 2 / 8),
        "h3": (16384 - 1024, 1 / 8),
    }
    # As the ranking's reason says it.
    assert (
        "CPU 25% and memory 12% committed after placement" in _by_host(_three(), "a")["h2"].reasons
    )


# ---------------------------------------------------------------------- the manager


def _store(name: str) -> dict[str, Any]:
    return {"name": name, "path": f"/srv/{name}", "shared": False}


def _cluster(tmp_path: Path, disk: bool = False) -> tuple[World, str]:
    """h1 runs web (and nothing else); h2 is in maintenance; h3 lacks web's bridge; h4 and
    h5 take it, h5 also runs db. ``disk``: web has one, on h1's local datastore; h4 has a
    datastore "fast"."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=("h1", "h2", "h3", "h4", "h5"), polls_to_complete=2)
    for h in world.hosts:
        world.facts_override[h] = {"cpus": 4, "memory_bytes": 8 * GIB}
    world.facts_override["h3"]["bridges"] = []
    disks = []
    if disk:
        world.facts_override["h1"]["datastores"] = [_store("local")]
        world.facts_override["h4"]["datastores"] = [_store("fast")]
        disks = [Disk(datastore="local", path="web/disk0.qcow2")]
    world.register_hosts(db)
    world.add_running_vm(db, "web", "h1", memory_mib=1024, disks=disks)
    world.add_running_vm(db, "db", "h5", memory_mib=1024)
    with db.session() as s:
        s.query(Host).filter_by(name="h2").one().state = "maintenance"
    db.engine.dispose()
    return world, url


def _targets(body: Any) -> dict[str, MigrationTarget]:
    return {t["host"]: MigrationTarget.model_validate(t) for t in body}


def test_every_host_is_listed_with_its_verdict(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        r = await c.get("/v1/vms/web/migrate/targets")
        assert r.status_code == 200, r.text
        order = [t["host"] for t in r.json()]
        got = _targets(r.json())
        assert set(got) == {"h1", "h2", "h3", "h4", "h5"}
        # Feasible first (h4 before h5: emptier), the refused after, greyed, never hidden.
        assert [h for h in order if got[h].feasible] == ["h4", "h5"]
        assert order[:2] == ["h4", "h5"]
        assert got["h4"].refusals == [] and got["h4"].score < got["h5"].score

        here = got["h1"]
        assert here.current and not here.feasible and here.reasons[0] == "current host"
        assert here.refusals == []
        assert not any(t.current for h, t in got.items() if h != "h1")

        down = got["h2"]
        assert not down.feasible and "maintenance" in down.reasons
        assert [x.code for x in down.refusals] == ["host_unavailable"]

        bare = got["h3"]
        assert not bare.feasible
        assert [x.code for x in bare.refusals] == ["bridge_missing"]
        assert bare.refusals[0].field == "to" and "vmbr0" in bare.refusals[0].message

        # The figures: 8 GiB less the host's reservation (512 MiB), db's and web's memory.
        assert got["h5"].free_memory_mib_after == 8192 - 512 - 1024 - 1024
        assert here.free_memory_mib_after == 8192 - 512 - 1024
        assert got["h4"].cpu_committed_after == pytest.approx(1 / 4)

        # What the verdict says is what the submission answers.
        refused = await c.post("/v1/vms/web/migrate", json={"to": "h3"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "bridge_missing"

        missing = await c.get("/v1/vms/nope/migrate/targets")
        assert missing.status_code == 404, missing.text

    run_manager(world, url, test)


def test_a_must_rule_is_the_first_refusal(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        rule = {"name": "apart", "kind": "anti-affinity", "vms": ["web", "db"]}
        assert (await c.post("/v1/rules", json=rule)).status_code == 201
        got = _targets((await c.get("/v1/vms/web/migrate/targets")).json())
        h5 = got["h5"]
        assert not h5.feasible and "must rule apart forbids it" in h5.reasons
        assert [x.code for x in h5.refusals] == ["rule_violation"]
        assert "apart" in h5.refusals[0].message
        assert got["h4"].feasible

    run_manager(world, url, test)


def test_with_a_datastore_the_current_host_is_the_storage_moves_target(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        r = await c.get("/v1/vms/web/migrate/targets", params={"datastore": "fast"})
        assert r.status_code == 200, r.text
        got = _targets(r.json())
        here = got["h1"]
        assert here.current and not here.feasible
        assert here.reasons[0] == "current host: the VM stays, its disks move to fast"
        # web has no disks, and no host reaches "fast": the storage move's own refusals.
        assert {x.code for x in here.refusals} == {"no_disks", "datastore_unreachable"}
        # Elsewhere, a shared-nothing migration's: the datastore is not on the target.
        assert [x.code for x in got["h4"].refusals] == ["datastore_missing"]
        assert got["h4"].datastores == []

    run_manager(world, url, test)


def test_a_shared_nothing_target_leaves_free_space_to_the_submission(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path, disk=True)

    async def test(c: Client) -> None:
        # Without a datastore, web's local disk keeps it home: every other host refuses.
        plain = _targets((await c.get("/v1/vms/web/migrate/targets")).json())
        assert not any(t.feasible for t in plain.values())
        assert "datastore_unreachable" in [x.code for x in plain["h4"].refusals]

        r = await c.get("/v1/vms/web/migrate/targets", params={"datastore": "fast"})
        got = _targets(r.json())
        assert [h for h, t in got.items() if t.feasible] == ["h4"]
        assert r.json()[0]["host"] == "h4"
        assert got["h4"].datastores == ["fast"] and got["h1"].datastores == ["local"]
        assert got["h4"].notes == ["free space on datastore fast checked at submit"]
        assert [x.code for x in got["h5"].refusals] == ["datastore_missing"]
        assert got["h5"].notes == []
        # Its own host does not reach "fast": the storage move is refused there.
        assert [x.code for x in got["h1"].refusals] == ["datastore_unreachable"]

    run_manager(world, url, test)


def test_a_viewer_may_list_the_targets(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        assert (await c.post("/v1/users", json={"name": "vera", "role": "viewer"})).is_success
        r = await c.post("/v1/users/vera/tokens", json={"label": "test"})
        viewer = {"Authorization": f"Bearer {r.json()['token']}"}
        listed = await c.get("/v1/vms/web/migrate/targets", headers=viewer)
        assert listed.status_code == 200, listed.text
        refused = await c.post("/v1/vms/web/migrate", json={"to": "h4"}, headers=viewer)
        assert refused.status_code == 403

    run_manager(world, url, test)


def test_the_runners_verdict_follows_the_submissions_dispatch(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    db = Database(url)
    runner = world.runner(db)
    # Running: the live pre-checks (h1 is its own host; a live move there is refused).
    assert [r.code for r in runner.refusals("web", "h3", None)] == ["bridge_missing"]
    assert [r.code for r in runner.refusals("web", "h1", None)] == ["same_host"]
    assert runner.refusals("web", "h4", None) == []
    # Stopped: the cold ones, from the inventory's definition (no agent asked).
    with db.session() as s:
        s.query(Vm).filter_by(name="web").one().state = "stopped"
    asked = len(world.requests)
    assert [r.code for r in runner.refusals("web", "h3", None)] == ["bridge_missing"]
    assert runner.refusals("web", "h4", None) == []
    assert [r.code for r in runner.refusals("web", "h4", "fast")] == ["datastore_unreachable"]
    assert len(world.requests) == asked
    db.engine.dispose()
