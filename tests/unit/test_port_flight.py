"""The flight recorder alone: what the port writes down and the report made of it, with the
times passed in (no port, no agents, no clock)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qmotion.api.migration import Leftover, MigrationStats
from qmotion.api.migration import QemuMigrationStatus as Qs
from qmotion.migration.convergence import DirtyMeasure, Ladder, Limits, PathMeasure, Rung, plan
from qmotion.migration.vocabulary import MigrationState, Phase
from qmotion.server.tasks.flight import MAX_SAMPLES, FlightRecorder, report

MIB = 1 << 20


def _ladder() -> Ladder:
    p = plan(512 * MIB, 512 * MIB, DirtyMeasure(), PathMeasure(bandwidth_bps=100e6), Limits())
    return Ladder.start(p, now=0.0)


def _active(throttle_pct: int = 0, transferred: int = 0) -> MigrationStats:
    return MigrationStats(
        status=Qs.ACTIVE, transferred=transferred, remaining=MIB, throttle_pct=throttle_pct
    )


def test_samples_stay_bounded_keeping_every_other_one() -> None:
    flight = FlightRecorder("vm1", "h1", "h2")
    ladder = _ladder()
    for i in range(MAX_SAMPLES + 1):
        flight.sample(_active(transferred=i), float(i), ladder)
    # Full at MAX_SAMPLES: halved to the even ones, then the newest added.
    assert len(flight.samples) == MAX_SAMPLES // 2 + 1
    assert [s.t_s for s in flight.samples[:3]] == [0.0, 2.0, 4.0]
    assert flight.samples[-1].t_s == float(MAX_SAMPLES)


def test_throttled_time_is_counted_between_throttled_samples() -> None:
    flight = FlightRecorder("vm1", "h1", "h2")
    ladder = _ladder()
    flight.sample(_active(throttle_pct=30), 1.0, ladder)  # the first sample counts nothing
    flight.sample(_active(throttle_pct=0), 2.5, ladder)
    flight.sample(_active(throttle_pct=30), 4.0, ladder)
    flight.sample(_active(throttle_pct=1), 9.0, ladder)  # 1 % is QEMU's dormant throttle
    assert flight.throttled_s == pytest.approx(1.5)


def test_a_change_that_did_not_apply_is_put_back_on_the_last_sample() -> None:
    flight = FlightRecorder("vm1", "h1", "h2")
    before = _ladder()
    climbed = replace(before, rung=Rung.DOWNTIME, downtime_ms=300, history=("downtime",))
    flight.sample(_active(), 1.0, climbed)
    assert (flight.samples[-1].rung, flight.samples[-1].downtime_limit_ms) == ("downtime", 300)
    flight.put_back(before)
    assert flight.samples[-1].rung == before.rung.value
    assert flight.samples[-1].downtime_limit_ms == before.downtime_ms


def test_postcopy_is_marked_once_from_when_migrate_was_issued() -> None:
    flight = FlightRecorder("vm1", "h1", "h2", issued_at=100.0)
    flight.mark_postcopy(112.3456)
    flight.mark_postcopy(130.0)
    assert flight.postcopy_at == pytest.approx(12.346)
    # A manager that restarted in postcopy does not know when it began.
    unknown = FlightRecorder("vm1", "h1", "h2")
    unknown.mark_postcopy(5.0)
    assert unknown.postcopy_at == 0.0


def test_the_report_is_made_of_the_record_alone() -> None:
    flight = FlightRecorder(
        "vm1",
        "h1",
        "h2",
        tls=True,
        streams=4,
        issued_at=10.5,
        migration_address="198.19.0.2",
        unreachable=["198.19.0.9: timed out"],
        destination_events=[("resumed", 5040.0), ("guest_frame_sent", 5038.0)],
        warnings=["no prediction: boom"],
        leftovers=[Leftover(host="h2", vm="vm1", what="x", why="y")],
        disk_copy_ms=1234.56,
        disk_bytes=8 * MIB,
        last_stats=MigrationStats(
            status=Qs.COMPLETED,
            total_time_ms=2000,
            downtime_ms=30,
            transferred=64 * MIB,
            passes=3,
            mbps=123.45,
            events=[("active", 3000.0), ("stopped", 5000.0)],
        ),
    )
    state = MigrationState(phase=Phase.DONE, warnings=("announce: lost",))
    climbed = replace(_ladder(), rung=Rung.DOWNTIME, downtime_ms=300, history=("downtime",))
    r = report(flight, state, accepted=10.0, queued_s=0.25, now=13.0, ladder=climbed)
    assert r.rungs == ["downtime"]
    assert (r.vm, r.source, r.destination, r.outcome) == ("vm1", "h1", "h2", Phase.DONE)
    assert r.wall_ms == 3000.0 and r.queued_ms == 250.0 and r.orchestration_ms == 250.0
    assert r.streams == 4 and r.tls and r.migration_address == "198.19.0.2"
    assert r.warnings == [
        "announce: lost",
        "no prediction: boom",
        "fell back from 198.19.0.9: timed out",
    ]
    assert r.leftovers == flight.leftovers
    assert (
        r.guest_paused_ms == 40.0 and r.guest_frame_ms == 38.0 and r.source_stopped_at_ms == 5000.0
    )
    assert (r.total_ms, r.downtime_ms, r.passes, r.throughput_mbps) == (2000, 30, 3, 123.5)
    assert r.disk_copy_ms == 1234.6 and r.disk_bytes == 8 * MIB
    # One classic stream is one stream; nothing sampled, nothing throttled.
    empty = report(FlightRecorder("vm1", "h1", "h2"), MigrationState(), 0.0, 0.0, 1.0)
    assert empty.streams == 1 and empty.max_throttle_pct == 0 and empty.rungs == []
    assert empty.orchestration_ms is None and empty.total_ms is None
