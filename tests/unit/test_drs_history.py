"""What DRS learns from past moves (server/automation/drs_history.py), on a real database:
the back-off of failed moves and the rules that hold a VM off a host."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qmotion.api.drs import RecommendationState
from qmotion.drs.model import Policy, Snapshot
from qmotion.drs.planner import plan
from qmotion.server.automation.drs_history import BACKOFF_MAX_S, backoffs, hold
from qmotion.server.db import Database, Recommendation

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _db(tmp_path: Path, history: list[tuple[str, str, str, float]]) -> Database:
    """``history``: (VM, target, state, minutes before NOW it ended)."""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.session() as s:
        for i, (vm, target, state, ago) in enumerate(history):
            s.add(
                Recommendation(
                    run_id=i + 1,
                    vm=vm,
                    source="h1",
                    target=target,
                    priority=3,
                    reason="balance load",
                    gain=0.1,
                    wave=0,
                    state=state,
                    message="boom" if state == RecommendationState.FAILED else None,
                    applied_at=NOW - timedelta(minutes=ago),
                )
            )
    return db


FAILED, APPLIED = RecommendationState.FAILED, RecommendationState.APPLIED


def test_each_failure_in_a_row_doubles_the_wait(tmp_path: Path) -> None:
    db = _db(tmp_path, [("v", "h2", FAILED, 1.5), ("v", "h2", FAILED, 0.5)])
    [b] = backoffs(db, NOW)
    assert (b.vm, b.target, b.failures) == ("v", "h2", 2)
    assert b.until == NOW - timedelta(minutes=0.5) + timedelta(seconds=120)
    assert "failed 2 times in a row (last: boom)" in b.reason
    assert backoffs(db, NOW + timedelta(minutes=2)) == []  # waited out


def test_a_success_clears_the_streak_and_other_targets_are_apart(tmp_path: Path) -> None:
    db = _db(
        tmp_path,
        [
            ("v", "h2", FAILED, 10),
            ("v", "h3", APPLIED, 5),
            ("v", "h2", FAILED, 0.5),
            ("w", "h3", FAILED, 0.2),
        ],
    )
    got = {(b.vm, b.target): b.failures for b in backoffs(db, NOW)}
    assert got == {("v", "h2"): 1, ("w", "h3"): 1}


def test_a_move_that_always_fails_stays_at_the_longest_wait(tmp_path: Path) -> None:
    """Failures older than a few hours used to drop out of the count: the wait came back
    down to 16 minutes for a move that had failed a dozen times."""
    history, t = [], 0.0
    for n in range(12):  # each retried as soon as its wait ended
        t += min(60 * 2**n, BACKOFF_MAX_S) / 60
        history.append(t)
    db = _db(tmp_path, [("v", "h2", FAILED, t - x) for x in history])
    [b] = backoffs(db, NOW)
    assert b.failures == 12
    assert b.until == NOW + timedelta(seconds=BACKOFF_MAX_S)


def _snap(**extra: Any) -> Snapshot:
    hosts = [{"name": h, "cpu_capacity": 8, "memory_mib": 16384} for h in ("h1", "h2", "h3")]
    vms = [{"name": "v", "host": "h1", "memory_mib": 1024}]
    return Snapshot.model_validate({"hosts": hosts, "vms": vms, **extra})


def test_hold_is_must_where_it_can_be_never_on_the_vms_host_and_should_otherwise() -> None:
    held = hold(_snap(), {"v": {"h1", "h2", "gone"}, "nobody": {"h2"}}, "backoff")
    [rule] = held.rules
    assert (rule.name, rule.strength, rule.hosts) == ("backoff:v", "must", ["h2"])
    only_h2 = {"name": "pin", "kind": "run_on", "strength": "must", "vms": ["v"], "hosts": ["h2"]}
    held = hold(_snap(rules=[only_h2]), {"v": {"h2"}}, "backoff")
    assert [(r.name, r.strength) for r in held.rules] == [("pin", "must"), ("backoff:v", "should")]


def test_a_failed_target_is_used_again_when_no_other_host_fits() -> None:
    """An evacuation holds a failed target as a should rule: a transient failure on the only
    host with room is retried there, not the end of the evacuation."""
    hosts = [
        {"name": "h1", "cpu_capacity": 8, "memory_mib": 16384, "maintenance": True},
        {"name": "h2", "cpu_capacity": 8, "memory_mib": 16384},
        {"name": "h3", "cpu_capacity": 8, "memory_mib": 4096},
    ]
    vms = [{"name": "v", "host": "h1", "memory_mib": 8192}]
    snap = Snapshot.model_validate({"hosts": hosts, "vms": vms})
    p = plan(hold(snap, {"v": {"h2"}}, "failed", strength="should"), Policy(threshold=1), NOW)
    assert [(m.vm, m.target) for m in p.moves] == [("v", "h2")], p.unplaced
    roomy = snap.model_copy(
        update={"hosts": [*snap.hosts[:2], snap.hosts[2].model_copy(update={"memory_mib": 16384})]}
    )
    p = plan(hold(roomy, {"v": {"h2"}}, "failed", strength="should"), Policy(threshold=1), NOW)
    assert [(m.vm, m.target) for m in p.moves] == [("v", "h3")]
