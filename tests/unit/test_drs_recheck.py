"""The DRS re-check of one move, pure, on small in-memory snapshots of the live cluster."""

from __future__ import annotations

from qmotion.drs.model import Rule
from qmotion.drs.recheck import LiveCluster, LiveHost, recheck, rule_refusal

UP = LiveHost(state="up", health="ok")
HOSTS = {"h1": UP, "h2": UP, "h3": UP}
APART = Rule(name="apart", kind="anti_affinity", vms=["a", "b"])
TOGETHER = Rule(name="together", kind="affinity", vms=["a", "b"])


def live(
    placement: dict[str, str],
    *rules: Rule,
    inflight: dict[str, str] | None = None,
    hosts: dict[str, LiveHost] = HOSTS,
    proactive: bool = False,
) -> LiveCluster:
    return LiveCluster(placement, list(rules), inflight or {}, hosts, proactive)


def test_a_move_the_cluster_still_allows_goes_ahead() -> None:
    snap = live({"a": "h1", "b": "h2"}, APART)
    assert recheck(snap, "a", "h1", "h3") is None


def test_the_vm_must_still_be_where_the_plan_found_it() -> None:
    snap = live({"a": "h3"})
    assert recheck(snap, "gone", "h1", "h2") == "the VM no longer exists"
    assert recheck(snap, "a", "h1", "h2") == "it is on h3 now, not h1"


def test_the_target_must_be_up_and_if_proactive_healthy() -> None:
    hosts = {
        "h1": UP,
        "h2": LiveHost(state="entering-maintenance"),
        "h3": LiveHost(state="up", health="degraded", health_reasons=("disk", "fan")),
    }
    snap = live({"a": "h1"}, hosts=hosts)
    assert recheck(snap, "a", "h1", "h2") == "host h2 is entering-maintenance"
    assert recheck(snap, "a", "h1", "h9") == "host h9 is gone"
    # A degraded host takes moves unless drs.proactive keeps them away.
    assert recheck(snap, "a", "h1", "h3") is None
    proactive = live({"a": "h1"}, hosts=hosts, proactive=True)
    assert recheck(proactive, "a", "h1", "h3") == "host h3 is degraded: disk; fan"


def test_the_recheck_refuses_a_move_that_now_breaks_a_must_rule() -> None:
    # Planned when b was elsewhere; b has moved to h2 since.
    snap = live({"a": "h1", "b": "h2"}, APART)
    assert recheck(snap, "a", "h1", "h2") == (
        "a on h2 would break must rule apart (--force to do it anyway)"
    )


def test_a_migration_under_way_counts_at_its_destination_too() -> None:
    snap = live({"a": "h1", "b": "h3"}, APART, inflight={"b": "h2"})
    assert recheck(snap, "a", "h1", "h2") is not None
    assert recheck(snap, "a", "h1", "h3") is not None  # b is still there meanwhile
    assert recheck(live({"a": "h1", "b": "h3"}, APART), "a", "h1", "h2") is None


def test_submitted_moves_count_as_made() -> None:
    snap = live({"a": "h1", "b": "h3"}, APART)
    assert recheck(snap, "a", "h1", "h2", submitted={"b": "h2"}) is not None
    # ... and a VM already submitted away frees its host.
    assert (
        recheck(live({"a": "h1", "b": "h2"}, APART), "a", "h1", "h2", submitted={"b": "h3"}) is None
    )


def test_must_affinity_partners_still_planned_move_with_the_vm() -> None:
    snap = live({"a": "h1", "b": "h1", "c": "h1"}, TOGETHER)
    assert recheck(snap, "a", "h1", "h2", planned={"a": "h2", "b": "h2"}) is None
    # b's move was skipped or failed, so it is no longer planned: a stays with it.
    assert recheck(snap, "a", "h1", "h2", planned={"a": "h2"}) == (
        "a on h2 would break must rule together (--force to do it anyway)"
    )
    # Only partners' planned moves count: c is in no rule with a.
    apart = Rule(name="apart", kind="anti_affinity", vms=["a", "c"])
    snap = live({"a": "h1", "b": "h1", "c": "h2"}, TOGETHER, apart)
    assert recheck(snap, "a", "h1", "h2", planned={"b": "h2", "c": "h3"}) == (
        "a on h2 would break must rule apart (--force to do it anyway)"
    )


def test_rule_refusal_of_an_operators_move_and_a_new_vm() -> None:
    pinned = Rule(name="pinned", kind="run_on", vms=["a"], hosts=["h1"])
    soft = Rule(name="soft", kind="anti_affinity", strength="should", vms=["a", "b"])
    snap = live({"a": "h1", "b": "h2"}, APART, pinned, soft)
    assert rule_refusal(snap, "a", "h2") == (
        "a on h2 would break must rule apart, pinned (--force to do it anyway)"
    )
    # Not a move (a storage move on its host): nothing to refuse.
    assert rule_refusal(snap, "a", "h1") is None
    # A VM being created is not where a record of the same name says.
    assert rule_refusal(snap, "a", "h1", new=True) is None
    assert rule_refusal(snap, "a", "h3", new=True) == (
        "a on h3 would break must rule pinned (--force to do it anyway)"
    )
    # A rule may name a VM not created yet.
    assert rule_refusal(live({"b": "h2"}, APART), "b", "h3") is None
