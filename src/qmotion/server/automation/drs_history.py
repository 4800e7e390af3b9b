"""What DRS learns from past moves: the link between two hosts, and the moves that failed.

Links. What the last completed migration between two hosts carried (its report's throughput,
the figure ``vm migrate --dry-run`` also starts from) and the round trip its route measured
are that pair's link; a pair never used
gets the median of the known ones (the cluster's network is usually one kind), or the model's
default. The planner prices each move and judges whether it converges from them
(qmotion.drs.cost).

Back-off. A DRS move that failed is not planned again at once: each (VM, target) waits
``BACKOFF_BASE_S`` after its first failure, twice as long after each further one in a row, at
most ``BACKOFF_MAX_S``; any migration of the VM that succeeds (DRS's or another) clears
its record. The waiting moves are
held out of the plan by rules no operator can name (``backoff:VM``), reported with the time
they may run again, and shown on the failed recommendations (``retry_after``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from qmotion.api.drs import RecommendationState
from qmotion.api.migration import MigrationReport
from qmotion.drs.errors import SnapshotError
from qmotion.drs.model import DEFAULT_BANDWIDTH_MIB_S, DEFAULT_RTT_MS, Link, Rule, Snapshot
from qmotion.drs.rules import validate
from qmotion.server.db import Database, Recommendation, Task
from qmotion.server.tasks.task_view import COLD_MIGRATE

MiB = 1 << 20
LINK_HISTORY = 2000  # the most recent migrations read for the links
BACKOFF_BASE_S = 60.0
BACKOFF_MAX_S = 3600.0


@dataclass(frozen=True)
class Backoff:
    vm: str
    target: str
    failures: int
    until: datetime
    last_error: str | None

    @property
    def reason(self) -> str:
        times = "once" if self.failures == 1 else f"{self.failures} times in a row"
        last = f" (last: {self.last_error})" if self.last_error else ""
        return (
            f"its move to {self.target} failed {times}{last}; backing off until "
            f"{self.until:%Y-%m-%d %H:%M:%S} UTC"
        )


def links(db: Database, hosts: Iterable[str]) -> tuple[list[Link], float]:
    """The measured links between ``hosts`` and the bandwidth (MiB/s) for the other pairs."""
    known = set(hosts)
    seen: dict[tuple[str, str], Link] = {}
    with db.session() as s:
        rows = s.execute(
            select(Task.source, Task.destination, Task.result)
            .where(Task.kind == "migrate", Task.state == "succeeded")
            .order_by(Task.id.desc())
            .limit(LINK_HISTORY)
        )
        for src, dst, result in rows:
            if src not in known or dst not in known or src == dst or (src, dst) in seen:
                continue
            report = MigrationReport.model_validate(result) if result else None
            if report is None or not report.throughput_mbps:
                continue
            # The round trip the migration's route measured before it started.
            rtt = report.prediction.rtt_ms if report.prediction else DEFAULT_RTT_MS
            seen[(src, dst)] = Link(
                source=src,
                target=dst,
                bandwidth_mib_s=report.throughput_mbps * 1e6 / 8 / MiB,
                rtt_ms=max(rtt, 0.0),
            )
    found = list(seen.values())
    default = (
        statistics.median(x.bandwidth_mib_s for x in found) if found else DEFAULT_BANDWIDTH_MIB_S
    )
    return found, default


def backoffs(db: Database, now: datetime) -> list[Backoff]:
    """The DRS moves waiting after failing, each until when."""
    # Only a VM with a failure within the longest wait can be waiting; its streak counts
    # every failure since it last moved (by DRS or any migration), however long ago: a
    # window would let a move that always fails come back to short waits.
    since = now - timedelta(seconds=BACKOFF_MAX_S)
    ended = (RecommendationState.APPLIED, RecommendationState.FAILED)
    # (when, order, VM, target or None for "it moved", error)
    events: list[tuple[datetime, int, str, str | None, str | None]] = []
    with db.session() as s:
        recent = select(Recommendation.vm).where(
            Recommendation.state == RecommendationState.FAILED,
            Recommendation.applied_at >= since,
        )
        for r in s.scalars(
            select(Recommendation).where(
                Recommendation.state.in_(ended),
                Recommendation.applied_at.is_not(None),
                Recommendation.vm.in_(recent),
            )
        ):
            if r.applied_at is not None:
                failed = r.state == RecommendationState.FAILED
                events.append((r.applied_at, r.id, r.vm, r.target if failed else None, r.message))
        moved = s.execute(
            select(Task.ended_at, Task.id, Task.vm).where(
                Task.kind.in_(("migrate", COLD_MIGRATE)),
                Task.state == "succeeded",
                Task.ended_at.is_not(None),
                Task.vm.in_(recent),
            )
        )
        for at, task_id, vm in moved:
            if at is not None and vm is not None:
                events.append((at, task_id, vm, None, None))
    streak: dict[tuple[str, str], tuple[int, datetime, str | None]] = {}
    for at, _, vm, target, message in sorted(events, key=lambda e: (e[0], e[1])):
        if target is None:
            streak = {k: v for k, v in streak.items() if k[0] != vm}
            continue
        n = streak.get((vm, target), (0, at, None))[0] + 1
        streak[(vm, target)] = (n, at, message)
    out = []
    for (vm, target), (n, at, message) in sorted(streak.items()):
        wait = min(BACKOFF_BASE_S * 2 ** (n - 1), BACKOFF_MAX_S)
        until = at + timedelta(seconds=wait)
        if until > now:
            out.append(Backoff(vm, target, n, until, message))
    return out


def hold(snap: Snapshot, avoid: dict[str, set[str]], kind: str, strength: str = "must") -> Snapshot:
    """``snap`` with each VM kept off the hosts ``avoid`` names (rules ``KIND:VM``). A should
    rule is broken only when nothing else fits (and reported); a must rule never, so one is
    made must only where that leaves the rules satisfiable (else that rule alone is should)."""
    where = {v.name: v.host for v in snap.vms}
    hosts = {h.name for h in snap.hosts}
    extra = []
    for vm, targets in sorted(avoid.items()):
        # Never the host it is on: the rule keeps it from going there, not makes it leave.
        on = sorted((targets & hosts) - {where.get(vm)})
        if vm in where and on:
            extra.append(
                Rule(name=f"{kind}:{vm}", kind="not_run_on", strength="should", vms=[vm], hosts=on)
            )
    if not extra:
        return snap
    if strength == "should":
        return snap.model_copy(update={"rules": [*snap.rules, *extra]})
    rules = list(snap.rules)
    for rule in extra:
        strict = rule.model_copy(update={"strength": "must"})
        try:
            validate(snap.model_copy(update={"rules": [*rules, strict]}))
            rules.append(strict)
        except SnapshotError:
            rules.append(rule)
    return snap.model_copy(update={"rules": rules})
