"""Must-rule repairs in the DRS planner (issue 23's counterexamples, as explicit snapshots):
a must rule is repaired (or its VMs reported unplaced) whatever else holds them, labelled as
the must repair it is, and by moving the VM that can move."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from qmotion.drs.model import Policy, Snapshot
from qmotion.drs.planner import plan
from qmotion.drs.rules import RuleBook
from qmotion.drs.state import ClusterState

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def _snap(hosts: list[dict[str, Any]], vms: list[dict[str, Any]], rules: list[Any]) -> Snapshot:
    return Snapshot.model_validate({"hosts": hosts, "vms": vms, "rules": rules})


def _host(name: str, health: str = "ok") -> dict[str, Any]:
    return {"name": name, "cpu_capacity": 16, "memory_mib": 32768, "health": health}


def _vm(name: str, host: str) -> dict[str, Any]:
    return {"name": name, "host": host, "memory_mib": 1024, "vcpus": 1, "cpu_demand": 0.5}


def test_a_must_rule_on_a_degraded_host_is_repaired_at_threshold_1() -> None:
    """h0 degraded, v0 and v1 on it, must anti-affinity [v0, v1], threshold 1: the VMs entered
    as priority-2 "degraded host" units, the must-violation loop skipped them, threshold 1
    dropped priority 2: no move, nothing reported."""
    snap = _snap(
        [_host("h0", "degraded"), _host("h1")],
        [_vm("v0", "h0"), _vm("v1", "h0")],
        [{"name": "apart", "kind": "anti_affinity", "strength": "must", "vms": ["v0", "v1"]}],
    )
    p = plan(snap, Policy(threshold=1), NOW)
    # Either VM repairs it (the two cost the same: the tie goes by name).
    assert [(m.vm, m.target, m.priority) for m in p.moves] == [("v0", "h1", 1)], p.moves
    assert p.moves[0].reason == "must rule apart is broken"
    assert p.unplaced == []


def test_the_vm_that_can_move_repairs_the_rule() -> None:
    """a and b together on h0, must anti-affinity [a, b], b pinned to h0 (its cool-down): the
    planner moved the later VM only, and reported b unplaced although moving a fixes it."""
    snap = _snap(
        [_host("h0"), _host("h1")],
        [_vm("a", "h0"), _vm("b", "h0")],
        [
            {"name": "apart", "kind": "anti_affinity", "strength": "must", "vms": ["a", "b"]},
            {
                "name": "cooldown:b",
                "kind": "run_on",
                "strength": "must",
                "vms": ["b"],
                "hosts": ["h0"],
            },
        ],
    )
    p = plan(snap, Policy(threshold=1), NOW)
    assert [(m.vm, m.target) for m in p.moves] == [("a", "h1")], p.moves
    assert p.unplaced == [], p.unplaced


def _pinned(vm: str, host: str) -> dict[str, Any]:
    return {
        "name": f"cooldown:{vm}",
        "kind": "run_on",
        "strength": "must",
        "vms": [vm],
        "hosts": [host],
    }


def _apart(name: str, vms: list[str]) -> dict[str, Any]:
    return {"name": name, "kind": "anti_affinity", "strength": "must", "vms": vms}


def test_a_must_rule_left_broken_is_always_reported() -> None:
    """A review's counterexamples: the VM breaking the rule is not its group's first member;
    one pinned VM breaks five rules (a pass repairs one each). Whatever the passes did, every
    must rule holds or the VMs breaking it are listed unplaced, naming it; nothing is both
    moved and unplaced."""
    group = _snap(
        [_host("h0"), _host("h1")],
        [_vm("a", "h0"), _vm("b", "h0"), _vm("g", "h0")],
        [
            _apart("apart", ["a", "g"]),
            {"name": "grp", "kind": "affinity", "strength": "must", "vms": ["b", "g"]},
            _pinned("a", "h0"),
            _pinned("b", "h0"),
        ],
    )
    many = _snap(
        [_host(f"h{i}") for i in range(6)],
        [_vm("b", "h0"), *(_vm(f"a{i}", "h0") for i in range(1, 6))],
        [_pinned("b", "h0"), *(_apart(f"apart{i}", [f"a{i}", "b"]) for i in range(1, 6))],
    )
    for snap in (group, many):
        for threshold in (1, 3):
            p = plan(snap, Policy(threshold=threshold), NOW)
            moved = {m.vm for m in p.moves}
            unplaced = {u["vm"]: u["reason"] for u in p.unplaced}
            assert not moved & set(unplaced), (p.moves, p.unplaced)
            book = RuleBook.build(snap)
            state = ClusterState(snap, 0.0)
            for vm, host in p.placement.items():
                if state.placement[vm] != host:
                    state.move(vm, host)
            must = [r for r in snap.rules if r.strength == "must"]
            for rule, _bad in book.violations(state, must):
                assert any(rule.name in unplaced.get(v, "") for v in rule.vms), (rule, p)
