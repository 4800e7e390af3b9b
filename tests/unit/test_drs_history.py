"""What DRS learns from past moves (server/automation/drs_history.py), on a real database:
the links between hosts, the back-off of failed moves and the rules that hold a VM off a
host."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qmotion.api.drs import RecommendationState
from qmotion.api.migration import MigrationPhase, MigrationPrediction, MigrationReport
from qmotion.drs.model import Policy, Snapshot
from qmotion.drs.planner import plan
from qmotion.server.automation.drs_history import BACKOFF_MAX_S, backoffs, hold, links
from qmotion.server.db import Database, Recommendation, Task

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


def _migrated(db: Database, src: str, dst: str, mbps: float, rtt_ms: float | None) -> None:
    prediction = None
    if rtt_ms is not None:
        prediction = MigrationPrediction(
            vm="x",
            source=src,
            destination=dst,
            memory_bytes=1 << 30,
            resident_bytes=1 << 29,
            dirty_rate_bps=0,
            hot_set_bytes=0,
            sweep_bps=0,
            bandwidth_bps=1e8,
            bandwidth_from="probe",
            rtt_ms=rtt_ms,
            converges=True,
            total_s=1,
            downtime_ms=10,
            passes=1,
            measures=[],
            max_throttle_pct=0,
            xbzrle=False,
            max_downtime_ms=300,
            completion_timeout_s=60,
        )
    report = MigrationReport(
        outcome=MigrationPhase.DONE,
        vm="x",
        source=src,
        destination=dst,
        wall_ms=1000,
        throughput_mbps=mbps,
        prediction=prediction,
    )
    with db.session() as s:
        s.add(
            Task(
                kind="migrate",
                state="succeeded",
                source=src,
                destination=dst,
                result=report.model_dump(mode="json"),
            )
        )


def test_links_are_the_last_migration_per_pair_and_the_median_elsewhere(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    _migrated(db, "h1", "h2", 8000.0, 0.4)  # older, superseded by the next
    _migrated(db, "h1", "h2", 800.0, 150.0)
    _migrated(db, "h2", "h3", 1600.0, None)
    _migrated(db, "h1", "gone", 9000.0, 1.0)  # a host no longer there
    found, default = links(db, ["h1", "h2", "h3"])
    got = {(x.source, x.target): (round(x.bandwidth_mib_s, 1), x.rtt_ms) for x in found}
    assert got == {("h1", "h2"): (95.4, 150.0), ("h2", "h3"): (190.7, 0.5)}
    assert round(default, 1) == round((95.4 + 190.7) / 2, 1)
    assert links(Database(f"sqlite:///{tmp_path / 'empty.db'}"), ["h1"]) == ([], 1024.0)


def test_hold_softens_only_the_rule_that_cannot_be_must() -> None:
    snap = _snap(
        rules=[{"name": "pin", "kind": "run_on", "strength": "must", "vms": ["v"], "hosts": ["h2"]}]
    )
    snap = snap.model_copy(
        update={"vms": [*snap.vms, snap.vms[0].model_copy(update={"name": "w"})]}
    )
    held = hold(snap, {"v": {"h2"}, "w": {"h2"}}, "backoff")
    strength = {r.name: r.strength for r in held.rules}
    assert strength == {"pin": "must", "backoff:v": "should", "backoff:w": "must"}


def test_any_migration_of_the_vm_clears_its_back_off(tmp_path: Path) -> None:
    """Only an applied DRS move cleared it: six failures months ago and one today made a
    64-minute wait although an operator had moved the VM since."""
    db = _db(tmp_path, [("v", "h2", FAILED, 100_000 + i) for i in range(6)])
    with db.session() as s:
        s.add(
            Task(
                kind="migrate",
                state="succeeded",
                vm="v",
                source="h1",
                destination="h3",
                ended_at=NOW - timedelta(days=30),
            )
        )
        s.add(
            Recommendation(
                run_id=99,
                vm="v",
                source="h3",
                target="h2",
                priority=3,
                reason="balance load",
                gain=0.1,
                wave=0,
                state=FAILED,
                applied_at=NOW - timedelta(seconds=10),
            )
        )
    [b] = backoffs(db, NOW)
    assert b.failures == 1 and b.until == NOW + timedelta(seconds=50)
