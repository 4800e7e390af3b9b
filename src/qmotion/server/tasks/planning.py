"""The convergence plan of a live migration, beside its start: measured while the destination
is prepared, told to QEMU with the stream, or (a stream with multifd channels on a path whose
rate is known) after it started, as a tune. A mixin of the port (``port.AgentMigrationPort``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace

from qmotion.api.migration import UNLIMITED_BANDWIDTH, MigrationParams, MigrationTune, PathProbe
from qmotion.api.vm import VmSpec
from qmotion.client.errors import ClientError
from qmotion.migration.convergence import DirtyMeasure, Ladder, Limits, PathMeasure, Plan, plan
from qmotion.migration.params import apply_plan
from qmotion.migration.timeline import Stopwatch
from qmotion.server.db import Database
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.ends import Ends
from qmotion.server.tasks.flight import FlightRecorder
from qmotion.server.tasks.measure import measure

MEASURE_STEP = "measure guest and path"


def limits_of(params: MigrationParams) -> Limits:
    """The operator's knobs, as the task carries them."""
    capped = params.max_bandwidth < UNLIMITED_BANDWIDTH
    return Limits(
        max_downtime_ms=params.max_downtime_ms,
        timeout_s=params.timeout_s,
        bandwidth_bps=params.max_bandwidth if capped else None,
        allow_postcopy=params.postcopy,
    )


class Planning:
    """The port's plan: ``_planning`` runs beside preparing the destination; the ladder
    steers the stream by it."""

    db: Database
    inventory: Inventory
    vm: str
    spec: VmSpec
    params: MigrationParams
    ends: Ends
    flight: FlightRecorder
    watch: Stopwatch
    reach: PathProbe | None
    ladder: Ladder | None
    _clock: Callable[[], float]
    _planning: asyncio.Future[Plan | None] | None
    _path_known: bool

    async def _planned(self) -> None:
        if self._planning is not None:
            p = await self._planning
            self._planning = None
            self._adopt(p or self._unmeasured_plan())

    async def settle_plan(self, timeout_s: float) -> None:
        """Before the report: a measurement still under way (the stream started without it)
        is given ``timeout_s`` to finish, so the report has its prediction."""
        if self._planning is not None and not self._planning.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._planning), timeout_s)
        if self._planning is not None and self._planning.done():
            self._planning = None
        if self.flight.prediction is not None:
            # What both ends run with: a destination kept for a route one stream off keeps
            # its count, whatever the route measured now calls for.
            self.flight.prediction.streams = max(self.params.multifd_channels, 1)
        # Measured beside the stream: its step is in the report, whenever it ended.
        measured = [x for x in self.watch.steps if x.step == MEASURE_STEP]
        if measured and not any(x.step == MEASURE_STEP for x in self.flight.timeline):
            self.flight.timeline = [*self.flight.timeline, *measured]

    def _starts_before_plan(self) -> bool:
        """The stream may start while the guest is still being measured: with multifd
        streams nothing the plan decides is fixed at the start (QEMU refuses xbzrle with
        multifd, auto-converge is armed regardless), so the plan follows as a tune. Only on
        a path whose rate an earlier migration measured: the first one's probe would
        measure the link while the stream fills it. A classic stream waits: the measurement
        decides xbzrle, a capability."""
        return self.params.multifd_channels > 0 and not self.params.postcopy and self._path_known

    async def _measure_and_plan(
        self, routing: asyncio.Future[PathProbe | None] | None = None
    ) -> Plan | None:
        """The convergence plan: what QEMU is told at the start and the ladder it may climb.
        ``routing``: the route being checked again (the one at hand is the last migration's):
        the plan and the report's prediction take the RTT measured now."""
        limits = limits_of(self.params)
        reach = self.reach
        if routing is not None:
            # Waited for, never awaited: its failure (or its cancel) is the destination's step
            # to report; here the known route then stands.
            await asyncio.wait({routing})
            if not routing.cancelled() and routing.exception() is None:
                reach = routing.result() or reach
        began = self._clock()
        try:
            p, self.flight.prediction = await measure(
                self.db,
                self.inventory,
                self.vm,
                self.ends.src,
                self.ends.dst,
                limits,
                quick=True,
                reach=reach,
                tls=self.params.tls,
            )
        except Exception as exc:
            # Measuring is advice: whatever fails in it (an agent, a bug), the migration goes
            # on, and the ladder works from QEMU's own figures. (CancelledError is not caught.)
            self.flight.warnings.append(f"no prediction: {exc}")
            return None
        finally:
            self.watch.add(MEASURE_STEP, began, self._clock())
        return p

    def _adopt(self, p: Plan) -> None:
        """The plan, before the stream starts: QEMU is told it with the stream."""
        self.params = apply_plan(self.params, p)
        if p.xbzrle_cache_bytes and not self.params.xbzrle_cache_bytes:
            self._xbzrle_left_off()
        self.ladder = Ladder.start(p, now=0.0)

    def _xbzrle_left_off(self) -> None:
        self.flight.warnings.append(
            "xbzrle left off: QEMU does not combine it with multifd streams "
            f"({self.params.multifd_channels})"
        )

    def _unmeasured_plan(self, throughput_bps: float | None = None) -> Plan:
        """Without measurements: the operator's limits, and timeouts from what the stream
        carries now if it runs (else the bandwidth cap), auto-converge armed."""
        rate = throughput_bps if throughput_bps and throughput_bps >= 1.0 else None
        p = plan(
            self.spec.memory << 20,
            self.spec.memory << 20,
            DirtyMeasure(),
            PathMeasure(bandwidth_bps=rate or float(self.params.max_bandwidth)),
            limits_of(self.params),
        )
        return replace(p, auto_converge=True)

    async def _plan_arrived(self, p: Plan) -> None:
        """The measured plan of a stream that started before it: its ladder from now on,
        and what it sets at the start told to QEMU now (QEMU throttles no earlier than its
        second sync, so a throttle from the start still applies in time). A ladder that
        already climbed (the interim one judged a pass first) keeps its rung and history
        and takes the plan's limits only."""
        if p.xbzrle_cache_bytes:
            self._xbzrle_left_off()
        if self.ladder is not None and self.ladder.history:
            self.ladder = replace(self.ladder, plan=p)
            return
        # What QEMU has now: the interim ladder's limit if one ran, else the start's.
        current = self.ladder.downtime_ms if self.ladder else self.params.downtime_limit_ms
        tune = MigrationTune(
            downtime_limit_ms=p.initial_downtime_ms if p.initial_downtime_ms != current else None,
            throttle_pct=p.throttle_from_start_pct or None,
        )
        if tune.downtime_limit_ms is not None or tune.throttle_pct is not None:
            try:
                await self.ends.source_raw(lambda c: c.tune_migration(self.vm, tune))
            except ClientError as exc:
                # Not applied: the ladder starts where QEMU is (no throttle woken), so it
                # asks for the throttle itself when a pass shows it is needed.
                self.flight.warnings.append(f"could not apply the measured plan: {exc}")
                self.ladder = Ladder.start(
                    replace(p, throttle_from_start_pct=0, initial_downtime_ms=current), now=0.0
                )
                return
        self.ladder = Ladder.start(p, now=0.0)
        self.params = self.params.model_copy(
            update={
                "downtime_limit_ms": p.initial_downtime_ms,
                "throttle_initial_pct": p.throttle_from_start_pct,
            }
        )
