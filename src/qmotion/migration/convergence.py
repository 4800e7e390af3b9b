"""Convergence of a pre-copy migration: predicted from measurements, then steered by a ladder.

Pure: no I/O and no clock. The manager measures the guest (QMP ``calc-dirty-rate``, twice, so
a hot set rewritten constantly is told apart from a sweep over new pages) and the path, asks
``plan`` what the migration will need, and during the migration feeds every progress sample to
``decide``, which answers with the parameters to change or an abort.

The ladder, climbed only when the measured passes say the current rung does not converge:

    precopy    the downtime limit the operator's priority allows by default (20 ms)
    downtime   the limit raised to what the last pass shows is needed, up to --max-downtime-ms
    throttle   auto-converge: the guest's vCPUs slowed until it dirties less than the link
               carries (QEMU raises the throttle every other pass that still dirties too
               much)
    postcopy   only with --allow-postcopy, instead of the throttle (and instead of an abort
               by a timeout): the destination runs the VM at once and pulls the pages it
               touches; it cannot be rolled back, so the timeouts no longer apply

xbzrle is not a rung: QEMU fixes capabilities when the stream starts, so it is switched on at
the start when the measurement finds a hot set (pages rewritten within a second), with a cache
that holds it. Auto-converge is likewise switched on at the start whenever a throttle may be
needed, held dormant (1 %, threshold 100 %) until the ladder reaches it; when the measured dirty
rate already outruns the link, auto-converge is set to its full first step with the stream (a
pass spent proving what the measurement showed costs a full copy of the working set); QEMU
still applies it only from its second sync that found too much dirtied.

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
COMPLETION_COPIES = 6  # and at least the time of this many full copies at the link's rate
MIN_COMPLETION_S = 60.0
PROGRESS_TIMEOUT_S = 90.0
# A hot set counts when it is this large and this share of a short sample: below that, the
# fit is within page sampling's noise (6 MiB "hot" measured on a pure 40 MiB/s sweep here).
HOT_SET_MIN_BYTES = 16 * MiB
HOT_SET_MIN_SHARE = 0.25
# Dormant auto-converge: QEMU's smallest throttle, triggered only when dirtying outruns sending.
DORMANT_THROTTLE = (1, 1, 100, 1)  # initial %, increment %, trigger threshold %, max %
THROTTLE_INCREMENT = 20
# The throttle's ceiling. At p % QEMU lets each vCPU run 10 ms, then sleep 10 ms x p/(100-p).
# Measured here (bench/convergence.py, TCG, 2026-12-07): capped at 90 % a guest writing 1x or
# 2x the link never converged in 120 s; at 97 % it did, but its TCP service stalled 5.9-7.5 s
# (99 %: 5.4-8.5 s). No ceiling both converges and keeps the guest serving: that takes
# postcopy, so the ceiling stays QEMU's own.
MAX_THROTTLE = 99
MAX_PASSES = 200
# Escalate when a pass leaves more than this share of the previous one: it will not converge
# soon enough by itself (what is left shrinks geometrically: the total stays within ~3x the
# first pass).
SHRINK_ENOUGH = 0.7
DOWNTIME_MARGIN = 1.3  # the limit set is the needed downtime times this (the rate varies)
# A sync ends a pass when just before it no more was left than this much sending carries.
PASS_END_S = 1.0
PASS_END_BYTES = 4 * MiB
BG_SYNC_S = 5.0  # QEMU >= 9.2 with auto-converge: a background sync at least this often
OVERDUE_FACTOR = 1.2  # a pass this much longer than sending what the last one left is overdue
POSTCOPY_SWITCH_MS = 30.0  # device state and the first faults, before the destination runs


class Rung(StrEnum):
    PRECOPY = "precopy"
    DOWNTIME = "downtime"
    THROTTLE = "throttle"
    POSTCOPY = "postcopy"


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
    allow_postcopy: bool = False


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
    postcopy: bool = False  # allowed: the ladder's last rung instead of the throttle


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
    # A hot set is bounded (xbzrle and the downtime carry it); only a sweep outruns a link.
    outruns = dirty.sweep_bps >= SHRINK_ENOUGH * bw
    hot = (
        dirty.hot_bytes >= HOT_SET_MIN_BYTES
        and dirty.hot_bytes >= HOT_SET_MIN_SHARE * dirty.dirtied(dirty.short_s)
        and dirty.hot_bytes / bw * 1000 > initial
    )
    # Twice the hot set, but not more than a quarter of the guest: the cache is host memory.
    quarter = 1 << max((memory_bytes // 4).bit_length() - 1, 20)  # QEMU wants a power of 2
    xbzrle = min(_pow2_at_least(dirty.hot_bytes * 2), quarter) if hot else 0
    base = Plan(
        initial_downtime_ms=initial,
        max_downtime_ms=max_dt,
        # Always armed (dormant): capabilities are fixed at the start, and a guest measured idle
        # may turn busy; the cost is QEMU's background sync every 5 s.
        auto_converge=True,
        # With postcopy allowed the guest is not slowed: postcopy follows the first pass.
        throttle_from_start_pct=throttle_for(bw, dirty.rate_bps)
        if outruns and not limits.allow_postcopy
        else 0,
        xbzrle_cache_bytes=xbzrle,
        completion_timeout_s=timeout,
        progress_timeout_s=PROGRESS_TIMEOUT_S,
        converges=False,
        total_s=0.0,
        downtime_ms=0.0,
        passes=0,
        measures=(),
        postcopy=limits.allow_postcopy,
    )
    return _simulate(base, memory_bytes, resident_bytes, dirty, bw, path.rtt_s)


def _simulate(
    p: Plan, memory: int, resident: int, dirty: DirtyMeasure, bw: float, rtt: float
) -> Plan:
    """Pass by pass, as QEMU sends and the ladder decides: the prediction of the plan."""
    ladder = Ladder.start(p, now=0.0)
    t = 2 * rtt  # the stream's setup
    to_send = float(min(max(resident, 0), memory))
    # QEMU wakes the throttle only at the second sync in which the guest dirtied too much:
    # the end of pass 2, or a background sync during it (QEMU >= 9.2 waits 5-10 s for one;
    # in the throttled bench runs here it coincided with the end of pass 2, ~10 s long), so
    # pass 3 is the first throttled. Then one step every other pass.
    armed = p.throttle_from_start_pct / 100
    throttle = 0.0
    measures: list[str] = ["auto-converge"] if p.throttle_from_start_pct else []
    ladder, _ = ladder.decide(Sample(t, 1, int(to_send), bw, dirty.rate_bps))
    for n in range(1, MAX_PASSES + 1):
        seconds = to_send / bw
        t += seconds
        # The guest rewrites what it has written: its resident memory bounds one pass.
        remaining = min(dirty.dirtied(seconds, throttle), float(max(resident, 1)), float(memory))
        if remaining / bw * 1000 <= ladder.downtime_ms:
            total = t + remaining / bw
            ok = total <= p.completion_timeout_s
            return replace(
                p,
                converges=ok,
                total_s=total,
                downtime_ms=remaining / bw * 1000 + rtt * 1000,
                passes=n + 1,
                measures=tuple(measures),
                max_throttle_pct=round(throttle * 100),
                why_not=None
                if ok
                else f"needs {total:.0f} s, more than the {p.completion_timeout_s:.0f} s timeout",
            )
        pct = round(throttle * 100)
        ladder, _ = ladder.decide(Sample(t, n, 0, bw, dirty.rate_bps, pct))  # the pass's tail
        sample = Sample(t, n + 1, int(remaining), bw, dirty.dirtied(1.0, throttle), pct)
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
        if decision.start_postcopy:
            # The destination runs now; what is left follows at the link's rate (the pages
            # the guest touches first), the pause is the device state and a round trip.
            total = t + remaining / bw
            return replace(
                p,
                converges=True,
                total_s=total,
                downtime_ms=POSTCOPY_SWITCH_MS + rtt * 1000,
                passes=n,
                measures=tuple(measures),
                max_throttle_pct=round(throttle * 100),
                why_not=None,
            )
        if decision.throttle_pct is not None:
            armed = decision.throttle_pct / 100
        elif armed and throttle == 0.0 and n >= 2:
            throttle = armed
        elif throttle and n % 2 == 0 and remaining > 0.5 * bw * seconds:
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
    expected_downtime_ms: float | None = None  # QEMU: dirty at the last sync / bandwidth


@dataclass(frozen=True)
class Decision:
    downtime_ms: int | None = None
    throttle_pct: int | None = None  # activate auto-converge at this initial throttle
    abort: str | None = None
    note: str | None = None
    start_postcopy: bool = False

    @property
    def changes(self) -> bool:
        return self.downtime_ms is not None or self.throttle_pct is not None or self.start_postcopy

    def describe(self) -> list[str]:
        out = []
        if self.downtime_ms is not None:
            out.append(f"downtime {self.downtime_ms} ms")
        if self.throttle_pct is not None:
            out.append("auto-converge")
        if self.start_postcopy:
            out.append("postcopy")
        return out


NOTHING = Decision()


@dataclass(frozen=True)
class Ladder:
    """Where the migration stands on the ladder, and what it has seen.

    It judges at pass ends only. QEMU syncs the dirty bitmap when a pass has sent everything,
    and (QEMU >= 9.2, auto-converge on) every 5 s in the background, mid-pass: a sync ends a
    pass when what was left just before it is about what a second of sending carries.
    """

    plan: Plan
    started_at: float
    rung: Rung = Rung.PRECOPY
    downtime_ms: int = DEFAULT_DOWNTIME_MS
    syncs_seen: int = 0
    tail_remaining: int | None = None  # the least remaining seen since the last sync
    passes: int = 0  # passes ended (judged)
    judged_at: float = 0.0
    sampled_at: float = 0.0
    first_remaining: int | None = None
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

    def _timeouts(self, s: Sample) -> Decision | None:
        if self.rung == Rung.POSTCOPY:
            return None  # past the point of no return: nothing to abort to
        decision = self._timed_out(s)
        if decision is not None and self.plan.postcopy:
            # Allowed: finish in postcopy rather than give up on the move.
            note = f"postcopy instead of abort: {decision.abort}"
            return Decision(start_postcopy=True, note=note)
        return decision

    def _timed_out(self, s: Sample) -> Decision | None:
        elapsed = s.at - self.started_at
        if elapsed > self.plan.completion_timeout_s:
            return Decision(
                abort=f"not complete after {elapsed:.0f} s "
                f"(completion timeout {self.plan.completion_timeout_s:.0f} s)"
            )
        # No new low for the progress timeout, beyond the time one pass of it takes to send.
        last = self.last_pass_remaining or self.first_remaining or 0
        allowance = last / s.throughput_bps if s.throughput_bps >= 1.0 else 0.0
        if s.at - self.best_at > self.plan.progress_timeout_s + min(allowance, 3600.0):
            return Decision(
                abort=f"no progress for {s.at - self.best_at:.0f} s "
                f"(remaining {s.remaining / MiB:.0f} MiB after pass {self.passes}, "
                f"rung {self.rung.value})"
            )
        return None

    def _pass_ended(self, s: Sample) -> bool:
        if self.syncs_seen == 0:
            return False  # QEMU's first sync starts the first pass
        if s.passes - self.syncs_seen >= 2 and s.at - self.sampled_at < BG_SYNC_S:
            return True  # two syncs between close samples: background ones are 5 s apart
        tail = self.tail_remaining
        # QEMU syncs once what is left fits the downtime limit: a pass ends within that plus a
        # sampling interval of sending.
        window = PASS_END_S + self.downtime_ms / 1000
        if tail is not None and tail <= max(s.throughput_bps * window, PASS_END_BYTES):
            return True
        # A guest that outruns the link never drains a pass: only background syncs come. Once
        # a pass is overdue by far, each sync is judged as one (what it left, against the last).
        if s.throughput_bps < 1.0 or self.first_remaining is None:
            return False
        last = self.last_pass_remaining or self.first_remaining
        overdue = OVERDUE_FACTOR * last / s.throughput_bps + 2 * BG_SYNC_S
        return s.at - self.judged_at > overdue

    def decide(self, s: Sample) -> tuple[Ladder, Decision]:
        """The ladder after ``s``, and what to change now."""
        st = self
        if st.rung == Rung.POSTCOPY:
            return st, NOTHING  # QEMU finishes it; there is nothing left to change
        if self.passes == 0 or s.throttle_pct > st.last_throttle_pct:
            # The first pass is progress by itself (the stall check watches its bytes), and
            # a throttle QEMU still tightens means the ladder has not run out of rungs.
            st = replace(st, last_throttle_pct=max(s.throttle_pct, st.last_throttle_pct))
            st = replace(st, best_at=s.at)
        if st.first_remaining is None:
            st = replace(st, first_remaining=s.remaining, judged_at=s.at)
        if s.passes <= st.syncs_seen:
            tail = s.remaining if st.tail_remaining is None else min(st.tail_remaining, s.remaining)
            st = replace(st, tail_remaining=tail, sampled_at=s.at)
            return st._or_postcopy(st._timeouts(s) or NOTHING)
        ended = st._pass_ended(s)
        st = replace(st, syncs_seen=s.passes, tail_remaining=s.remaining, sampled_at=s.at)
        if not ended:
            return st._or_postcopy(st._timeouts(s) or NOTHING)
        previous = st.last_pass_remaining
        st = replace(st, passes=st.passes + 1, last_pass_remaining=s.remaining, judged_at=s.at)
        if st.best_remaining is None or s.remaining < st.best_remaining * 0.95:
            st = replace(st, best_remaining=s.remaining, best_at=s.at)
        timed_out = st._timeouts(s)
        if timed_out is not None:
            return st._or_postcopy(timed_out)
        if s.throughput_bps < 1.0:
            return st, NOTHING
        # QEMU's expected downtime is what the last sync found dirty over the bandwidth.
        needed_ms = s.expected_downtime_ms
        if needed_ms is None:
            needed_ms = s.remaining / s.throughput_bps * 1000
        needed_ms = min(needed_ms, 1e9)
        if needed_ms <= st.downtime_ms:
            return st, NOTHING  # QEMU switches over by itself
        if previous is not None and s.remaining <= previous * SHRINK_ENOUGH:
            return st, NOTHING
        if (
            previous is None
            and st.rung == Rung.PRECOPY
            and s.remaining <= SHRINK_ENOUGH * (s.throughput_bps * (s.at - st.started_at))
        ):
            return st, NOTHING  # after the first pass: less dirty than it took to send
        wanted = min(math.ceil(needed_ms * DOWNTIME_MARGIN), st.plan.max_downtime_ms)
        if st.rung == Rung.PRECOPY and needed_ms <= st.plan.max_downtime_ms:
            return self._climb(st, Rung.DOWNTIME, Decision(downtime_ms=wanted))
        if st.rung == Rung.DOWNTIME and st.passes - st.rung_since_pass < 2:
            if wanted > st.downtime_ms:
                st = replace(st, downtime_ms=wanted)
                return st, Decision(downtime_ms=wanted, note="downtime raised again")
            return st, NOTHING
        if st.plan.postcopy:
            return self._climb(st, Rung.POSTCOPY, Decision(start_postcopy=True))
        if st.rung != Rung.THROTTLE and st.plan.auto_converge:
            pct = throttle_for(s.throughput_bps, s.dirty_bps)
            decision = Decision(
                downtime_ms=wanted if wanted > st.downtime_ms else None, throttle_pct=pct
            )
            return self._climb(st, Rung.THROTTLE, decision)
        if wanted > st.downtime_ms:
            st = replace(st, downtime_ms=wanted)
            return st, Decision(downtime_ms=wanted, note="downtime raised again")
        return st, NOTHING

    def _or_postcopy(self, d: Decision) -> tuple[Ladder, Decision]:
        """A timeout's answer: an abort, or (allowed) the climb to postcopy."""
        if d.start_postcopy:
            st, climbed = self._climb(self, Rung.POSTCOPY, d)
            return st, replace(climbed, note=d.note)
        return self, d

    @staticmethod
    def _climb(st: Ladder, rung: Rung, d: Decision) -> tuple[Ladder, Decision]:
        st = replace(
            st,
            rung=rung,
            rung_since_pass=st.passes,
            downtime_ms=d.downtime_ms or st.downtime_ms,
            history=(*st.history, rung.value),
        )
        return st, replace(d, note=f"rung {rung.value}: " + ", ".join(d.describe()))
