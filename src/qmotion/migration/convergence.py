"""Convergence of a pre-copy migration: predicted from measurements, then steered by a ladder.

Pure: no I/O and no clock. The manager measures the guest (QMP ``calc-dirty-rate``, twice, so
a hot set rewritten constantly is told apart from a sweep over new pages) and the path, asks
``plan`` what the migration will need, and during the migration feeds every progress sample to
``decide``, which answers with the parameters to change or an abort.

The ladder, climbed only when the measured passes say the current rung does not converge:

    precopy    the downtime limit the operator's priority allows by default (20 ms)
    downtime   the limit raised to what the last pass shows is needed, up to --max-downtime-ms
    throttle   auto-converge: the guest's vCPUs slowed until it dirties less than the link
               carries (QEMU raises the throttle each pass that still dirties too much)

xbzrle is not a rung: QEMU fixes capabilities when the stream starts, so it is switched on at
the start when the measurement finds a hot set (pages rewritten within a second), with a cache
that holds it. Auto-converge is likewise switched on at the start whenever a throttle may be
needed, held dormant (1 %, threshold 100 %) until the ladder reaches it; when the measured dirty
rate already outruns the link, the throttle starts with the stream (a pass spent proving what
the measurement showed costs a full copy of the working set).

Measured here (TCG guest writing at a set rate): a throttle bites only once the writer runs out
of CPU, so the first steps change little and QEMU's step is large (20 %); the linear model of
``DirtyMeasure.dirtied`` is the optimistic bound for such guests.

Then the two timeouts abort with the source running: a completion timeout (per GiB of guest
memory unless the operator gives ``--timeout``) and a progress timeout (no new low of the
remaining bytes for that long).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_DOWNTIME_MS = 20
DEFAULT_MAX_DOWNTIME_MS = 300
COMPLETION_S_PER_GIB = 120.0
COMPLETION_COPIES = 3  # and at least the time of this many full copies at the link's rate
MIN_COMPLETION_S = 60.0
PROGRESS_TIMEOUT_S = 90.0
# A hot set counts when it is this large and this share of a short sample: below that, the
# fit is within page sampling's noise (6 MiB "hot" measured on a pure 40 MiB/s sweep here).
HOT_SET_MIN_BYTES = 16 * MiB
HOT_SET_MIN_SHARE = 0.25
# Dormant auto-converge: QEMU's smallest throttle, triggered only when dirtying outruns sending.
DORMANT_THROTTLE = (1, 1, 100)  # initial %, increment %, trigger threshold %
THROTTLE_INCREMENT = 20
MAX_THROTTLE = 99
MAX_PASSES = 200
# Escalate when a pass leaves more than this share of the previous one: it will not converge
# soon enough by itself (what is left shrinks geometrically: the total stays within ~3x the
# first pass).
SHRINK_ENOUGH = 0.7
DOWNTIME_MARGIN = 1.3  # the limit set is the needed downtime times this (the rate varies)


class Rung(StrEnum):
    PRECOPY = "precopy"
    DOWNTIME = "downtime"
    THROTTLE = "throttle"


@dataclass(frozen=True)
class DirtyMeasure:
    """The guest's writes: a sweep over new pages (bytes/s) plus a hot set rewritten within
    every sample (bytes), fitted from two samples of different lengths."""

    sweep_bps: float = 0.0
    hot_bytes: float = 0.0
    short_s: float = 1.0  # the short sample's length: below it the hot set fills in linearly

    @classmethod
    def from_samples(
        cls, short: tuple[float, float], long: tuple[float, float] | None = None
    ) -> DirtyMeasure:
        """``short``/``long``: (seconds sampled, bytes found dirtied in them)."""
        t1, d1 = short
        if t1 <= 0:
            raise ValueError("a dirty-rate sample needs a positive length")
        if long is None or long[0] <= t1:
            return cls(sweep_bps=max(d1, 0.0) / t1, hot_bytes=0.0, short_s=t1)
        t2, d2 = long
        # d(t) = sweep * t + hot for t >= t1: two samples, two unknowns.
        sweep = max((d2 - d1) / (t2 - t1), 0.0)
        hot = max(d1 - sweep * t1, 0.0)
        return cls(sweep_bps=sweep, hot_bytes=hot, short_s=t1)

    def dirtied(self, seconds: float, throttle: float = 0.0) -> float:
        """Bytes found dirty after ``seconds`` with the vCPUs throttled by ``throttle`` (0-1)."""
        running = max(seconds, 0.0) * (1.0 - throttle)
        return self.sweep_bps * running + self.hot_bytes * min(1.0, running / self.short_s)

    @property
    def rate_bps(self) -> float:
        """What one second of the guest dirties: the figure an operator compares to the link."""
        return self.dirtied(1.0)


@dataclass(frozen=True)
class PathMeasure:
    bandwidth_bps: float  # what one migration stream carries, bytes/s
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_bps <= 0:
            raise ValueError("bandwidth must be positive")


@dataclass(frozen=True)
class Limits:
    """The operator's knobs; None: qmotion's defaults."""

    max_downtime_ms: int | None = None
    timeout_s: float | None = None
    bandwidth_bps: float | None = None


@dataclass(frozen=True)
class Plan:
    """What the migration is expected to need, fixed before it starts."""

    initial_downtime_ms: int
    max_downtime_ms: int
    auto_converge: bool
    throttle_from_start_pct: int  # 0: dormant until the ladder reaches the throttle
    xbzrle_cache_bytes: int  # 0: xbzrle off
    completion_timeout_s: float
    progress_timeout_s: float
    # The prediction, from the same decisions the ladder will take on the simulated passes.
    converges: bool
    total_s: float
    downtime_ms: float
    passes: int
    measures: tuple[str, ...]  # what the prediction needed, in order, for an operator
    max_throttle_pct: int = 0
    why_not: str | None = None


def throttle_for(link_bps: float, dirty_bps: float) -> int:
    """The throttle (%) under which a guest dirtying ``dirty_bps`` leaves the link ahead."""
    pct = 100 * (1 - 0.5 * link_bps / max(dirty_bps, 1.0))
    return int(min(max(pct, 30), MAX_THROTTLE))


def _pow2_at_least(n: float) -> int:
    return 1 << max(math.ceil(math.log2(max(n, 1.0))), 20)


def plan(
    memory_bytes: int,
    resident_bytes: int,
    dirty: DirtyMeasure,
    path: PathMeasure,
    limits: Limits,
) -> Plan:
    """The plan for one migration, and its predicted course (``total_s``, ``downtime_ms``)."""
    max_dt = limits.max_downtime_ms or max(DEFAULT_MAX_DOWNTIME_MS, DEFAULT_DOWNTIME_MS)
    initial = min(DEFAULT_DOWNTIME_MS, max_dt)
    bw = min(path.bandwidth_bps, limits.bandwidth_bps or math.inf)
    timeout = limits.timeout_s or max(
        MIN_COMPLETION_S,
        COMPLETION_S_PER_GIB * memory_bytes / GiB,
        COMPLETION_COPIES * memory_bytes / bw,
    )
    outruns = dirty.rate_bps >= SHRINK_ENOUGH * bw
    hot = (
        dirty.hot_bytes >= HOT_SET_MIN_BYTES
        and dirty.hot_bytes >= HOT_SET_MIN_SHARE * dirty.dirtied(dirty.short_s)
        and dirty.hot_bytes / bw * 1000 > initial
    )
    xbzrle = _pow2_at_least(dirty.hot_bytes * 2) if hot else 0
    base = Plan(
        initial_downtime_ms=initial,
        max_downtime_ms=max_dt,
        auto_converge=dirty.rate_bps > 0,
        throttle_from_start_pct=throttle_for(bw, dirty.rate_bps) if outruns else 0,
        xbzrle_cache_bytes=xbzrle,
        completion_timeout_s=timeout,
        progress_timeout_s=PROGRESS_TIMEOUT_S,
        converges=False,
        total_s=0.0,
        downtime_ms=0.0,
        passes=0,
        measures=(),
    )
    return _simulate(base, memory_bytes, resident_bytes, dirty, bw, path.rtt_s)


def _simulate(
    p: Plan, memory: int, resident: int, dirty: DirtyMeasure, bw: float, rtt: float
) -> Plan:
    """Pass by pass, as QEMU sends and the ladder decides: the prediction of the plan."""
    ladder = Ladder.start(p, now=0.0)
    t = 2 * rtt  # the stream's setup
    to_send = float(min(max(resident, 0), memory))
    throttle = p.throttle_from_start_pct / 100
    measures: list[str] = ["auto-converge"] if p.throttle_from_start_pct else []
    for n in range(1, MAX_PASSES + 1):
        seconds = to_send / bw
        t += seconds
        # The guest rewrites what it has written: its resident memory bounds one pass.
        remaining = min(dirty.dirtied(seconds, throttle), float(max(resident, 1)), float(memory))
        if remaining / bw * 1000 <= ladder.downtime_ms:
            downtime = remaining / bw * 1000 + rtt * 1000
            return replace(
                p,
                converges=t + remaining / bw <= p.completion_timeout_s,
                total_s=t + remaining / bw,
                downtime_ms=downtime,
                passes=n + 1,
                measures=tuple(measures),
                max_throttle_pct=round(throttle * 100),
                why_not=None
                if t <= p.completion_timeout_s
                else f"needs {t:.0f} s, more than the {p.completion_timeout_s:.0f} s timeout",
            )
        sample = Sample(
            at=t,
            passes=n,
            remaining=int(remaining),
            throughput_bps=bw,
            dirty_bps=dirty.dirtied(1.0, throttle),
            throttle_pct=round(throttle * 100),
        )
        ladder, decision = ladder.decide(sample)
        if decision.abort:
            return replace(
                p,
                converges=False,
                total_s=t,
                downtime_ms=0.0,
                passes=n,
                measures=tuple(measures),
                max_throttle_pct=round(throttle * 100),
                why_not=decision.abort,
            )
        for m in decision.describe():
            if m not in measures:
                measures.append(m)
        if decision.throttle_pct is not None:
            throttle = decision.throttle_pct / 100
        elif ladder.rung == Rung.THROTTLE and remaining > 0.5 * bw * seconds:
            # QEMU raises the throttle on each pass that dirtied over half of what it sent.
            throttle = min(throttle + THROTTLE_INCREMENT / 100, MAX_THROTTLE / 100)
        to_send = remaining
    return replace(
        p,
        converges=False,
        total_s=t,
        passes=MAX_PASSES,
        measures=tuple(measures),
        why_not=f"no convergence in {MAX_PASSES} passes",
    )


@dataclass(frozen=True)
class Sample:
    """One progress sample of the running migration, as QEMU reports it on the source."""

    at: float  # seconds since the migration started
    passes: int  # dirty-bitmap syncs so far
    remaining: int  # bytes
    throughput_bps: float
    dirty_bps: float
    throttle_pct: int = 0


@dataclass(frozen=True)
class Decision:
    downtime_ms: int | None = None
    throttle_pct: int | None = None  # activate auto-converge at this initial throttle
    abort: str | None = None
    note: str | None = None

    @property
    def changes(self) -> bool:
        return self.downtime_ms is not None or self.throttle_pct is not None

    def describe(self) -> list[str]:
        out = []
        if self.downtime_ms is not None:
            out.append(f"downtime {self.downtime_ms} ms")
        if self.throttle_pct is not None:
            out.append("auto-converge")
        return out


NOTHING = Decision()


@dataclass(frozen=True)
class Ladder:
    """Where the migration stands on the ladder, and what it has seen."""

    plan: Plan
    started_at: float
    rung: Rung = Rung.PRECOPY
    downtime_ms: int = DEFAULT_DOWNTIME_MS
    passes_seen: int = 0
    rung_since_pass: int = 0
    last_pass_remaining: int | None = None
    best_remaining: int | None = None
    best_at: float = 0.0
    last_throttle_pct: int = 0
    history: tuple[str, ...] = field(default=())

    @classmethod
    def start(cls, p: Plan, now: float) -> Ladder:
        if p.throttle_from_start_pct:
            return cls(
                plan=p,
                started_at=now,
                rung=Rung.THROTTLE,
                downtime_ms=p.initial_downtime_ms,
                best_at=now,
                history=(Rung.THROTTLE.value,),
            )
        return cls(plan=p, started_at=now, downtime_ms=p.initial_downtime_ms, best_at=now)

    def decide(self, s: Sample) -> tuple[Ladder, Decision]:
        """The ladder after ``s``, and what to change now."""
        st = self
        elapsed = s.at - self.started_at
        if st.best_remaining is None or s.remaining < st.best_remaining * 0.95:
            st = replace(st, best_remaining=s.remaining, best_at=s.at)
        if s.throttle_pct > st.last_throttle_pct:
            # QEMU is still tightening the throttle: the ladder has not run out of rungs.
            st = replace(st, last_throttle_pct=s.throttle_pct, best_at=s.at)
        if elapsed > self.plan.completion_timeout_s:
            return st, Decision(
                abort=f"not complete after {elapsed:.0f} s "
                f"(completion timeout {self.plan.completion_timeout_s:.0f} s)"
            )
        if s.at - st.best_at > self.plan.progress_timeout_s:
            return st, Decision(
                abort=f"no progress for {s.at - st.best_at:.0f} s "
                f"(remaining {s.remaining / MiB:.0f} MiB, rung {st.rung.value})"
            )
        if s.passes <= st.passes_seen:
            return st, NOTHING  # mid-pass: what is left is not known until the next sync
        previous = st.last_pass_remaining
        st = replace(st, passes_seen=s.passes, last_pass_remaining=s.remaining)
        if s.passes < 2 or s.throughput_bps < 1.0:
            return st, NOTHING  # the first pass sends everything once: nothing to judge yet
        needed_ms = min(s.remaining / s.throughput_bps * 1000, 1e9)
        if needed_ms <= st.downtime_ms:
            return st, NOTHING  # QEMU switches over by itself
        shrinking = (previous is not None and s.remaining <= previous * SHRINK_ENOUGH) or (
            0 < s.dirty_bps <= s.throughput_bps * SHRINK_ENOUGH
        )
        if shrinking:
            return st, NOTHING
        wanted = min(math.ceil(needed_ms * DOWNTIME_MARGIN), st.plan.max_downtime_ms)
        if st.rung == Rung.PRECOPY and needed_ms <= st.plan.max_downtime_ms:
            return self._climb(st, Rung.DOWNTIME, s, Decision(downtime_ms=wanted))
        if st.rung == Rung.DOWNTIME and s.passes - st.rung_since_pass < 2:
            if wanted > st.downtime_ms:
                st = replace(st, downtime_ms=wanted)
                return st, Decision(downtime_ms=wanted, note="downtime raised again")
            return st, NOTHING
        if st.rung != Rung.THROTTLE and st.plan.auto_converge:
            pct = throttle_for(s.throughput_bps, s.dirty_bps)
            decision = Decision(
                downtime_ms=wanted if wanted > st.downtime_ms else None, throttle_pct=pct
            )
            return self._climb(st, Rung.THROTTLE, s, decision)
        if wanted > st.downtime_ms:
            st = replace(st, downtime_ms=wanted)
            return st, Decision(downtime_ms=wanted, note="downtime raised again")
        return st, NOTHING

    @staticmethod
    def _climb(st: Ladder, rung: Rung, s: Sample, d: Decision) -> tuple[Ladder, Decision]:
        st = replace(
            st,
            rung=rung,
            rung_since_pass=s.passes,
            downtime_ms=d.downtime_ms or st.downtime_ms,
            history=(*st.history, rung.value),
        )
        return st, replace(d, note=f"rung {rung.value}: " + ", ".join(d.describe()))
