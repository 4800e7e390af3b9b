"""The flight recorder of one live migration, and the report made from it.

The port writes down what happened as it goes (progress samples, the switchover's marks, the
route, the warnings and what was left behind); the task's report reads only this record.
Times are the port's clock, passed in: nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmotion.api.migration import (
    DestinationStart,
    FlightSample,
    Leftover,
    MigrationPrediction,
    MigrationReport,
    MigrationStats,
    StepTime,
)
from qmotion.migration.convergence import Ladder
from qmotion.migration.vocabulary import MigrationState

MAX_SAMPLES = 600  # flight-recorder samples kept per migration


@dataclass
class FlightRecorder:
    """What one migration of ``vm`` from ``source`` to ``destination`` did, as the manager
    saw it."""

    vm: str
    source: str
    destination: str
    tls: bool = False
    streams: int = 0  # multifd channels; 0: one classic stream
    destination_start: DestinationStart | None = None  # paused: it runs on the word
    issued_at: float | None = None  # when QEMU's migrate was issued (the port's clock)
    postcopy_at: float | None = None  # since the migration began, seconds
    last_stats: MigrationStats | None = None
    samples: list[FlightSample] = field(default_factory=list)
    throttled_s: float = 0.0
    prediction: MigrationPrediction | None = None
    migration_address: str | None = None
    unreachable: list[str] = field(default_factory=list)  # the route fell back from these
    destination_events: list[tuple[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    disk_copy_ms: float | None = None  # shared-nothing: the disks' copy until in sync
    disk_bytes: int | None = None
    timeline: list[StepTime] = field(default_factory=list)  # accepted -> stream started

    def mark_postcopy(self, now: float) -> None:
        """QEMU reports postcopy: the first time is when it switched."""
        if self.postcopy_at is None:
            since = self.issued_at
            self.postcopy_at = round(now - since, 3) if since is not None else 0.0

    def sample(self, stats: MigrationStats, at: float, ladder: Ladder) -> None:
        """One progress sample ``at`` seconds since migrate was issued, with the rung the
        ladder stands on after it."""
        if self.samples and stats.throttle_pct > 1:
            self.throttled_s += at - self.samples[-1].t_s
        if len(self.samples) >= MAX_SAMPLES:
            # A long migration keeps every other sample: the record stays bounded.
            self.samples = self.samples[::2]
        self.samples.append(
            FlightSample(
                t_s=round(at, 3),
                transferred=stats.transferred,
                remaining=stats.remaining,
                dirty_bps=stats.dirty_bps,
                throughput_bps=round(stats.throughput_bps),
                throttle_pct=stats.throttle_pct,
                passes=stats.passes,
                rung=ladder.rung.value,
                downtime_limit_ms=ladder.downtime_ms,
            )
        )

    def put_back(self, ladder: Ladder) -> None:
        """The ladder was put back where QEMU is (a change it asked for did not apply): the
        last sample says what applied."""
        self.samples[-1].rung = ladder.rung.value
        self.samples[-1].downtime_limit_ms = ladder.downtime_ms


def report(
    flight: FlightRecorder,
    state: MigrationState,
    accepted: float,
    queued_s: float,
    now: float,
    ladder: Ladder | None = None,
) -> MigrationReport:
    """The migration report: QEMU's own figures plus what the manager measured around them.
    ``accepted`` and ``now`` on the port's clock; the rungs climbed are the ``ladder``'s own
    history, read now (a copy kept alongside could fall behind it)."""
    stats = flight.last_stats
    r = MigrationReport(
        outcome=state.phase,
        vm=flight.vm,
        source=flight.source,
        destination=flight.destination,
        wall_ms=round((now - accepted) * 1000, 1),
        warnings=[*state.warnings, *flight.warnings],
        leftovers=list(flight.leftovers),
        prediction=flight.prediction,
        rungs=list(ladder.history) if ladder is not None else [],
        max_throttle_pct=max((x.throttle_pct for x in flight.samples), default=0),
        throttled_s=round(flight.throttled_s, 1),
        postcopy_at_s=flight.postcopy_at,
        postcopy_recoveries=state.postcopy_recoveries,
        samples=flight.samples,
        migration_address=flight.migration_address,
        streams=max(flight.streams, 1),
        tls=flight.tls,
        disk_copy_ms=round(flight.disk_copy_ms, 1) if flight.disk_copy_ms is not None else None,
        disk_bytes=flight.disk_bytes,
        destination_start=flight.destination_start,
        start_timeline=list(flight.timeline),
    )
    if flight.unreachable:
        r.warnings.append("fell back from " + "; ".join(flight.unreachable))
    if stats is not None:
        r.total_ms, r.downtime_ms, r.setup_ms = (
            stats.total_time_ms,
            stats.downtime_ms,
            stats.setup_time_ms,
        )
        r.bytes, r.passes, r.throughput_mbps = stats.transferred, stats.passes, round(stats.mbps, 1)
        src = dict(stats.events)
        dst = dict(flight.destination_events)
        # Shared clock in a lab on one machine; on a real cluster both are agent-local.
        r.source_stopped_at_ms = src.get("stopped")
        if "stopped" in src and "resumed" in dst:
            r.guest_paused_ms = round(dst["resumed"] - src["stopped"], 1)
        if "stopped" in src and "guest_frame_sent" in dst:
            r.guest_frame_ms = round(dst["guest_frame_sent"] - src["stopped"], 1)
        if "stopped" in src and "client_frame_delivered" in dst:
            r.client_frame_ms = round(dst["client_frame_delivered"] - src["stopped"], 1)
        if stats.steer_ms is not None:
            r.steer_ms = round(stats.steer_ms, 1)
        if stats.finish_ms is not None:
            r.finish_ms = round(stats.finish_ms, 1)
        if stats.finish_error:
            r.warnings.append(f"the source's word to the destination failed: {stats.finish_error}")
        if stats.steer_error:
            r.steer_error = stats.steer_error
            r.warnings.append(f"switchover call to the destination failed: {stats.steer_error}")
    if flight.issued_at is not None:
        r.orchestration_ms = round((flight.issued_at - accepted - queued_s) * 1000, 1)
        r.queued_ms = round(queued_s * 1000, 1)
    return r
