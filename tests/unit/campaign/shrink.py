"""A failing schedule cut down to a minimal one that breaks the same invariant.

The run is deterministic, so a candidate schedule is tried by replaying it. First the
operations after the one during which the invariant broke go (the replay stops there anyway);
then delta debugging (Zeller's ddmin, complements only) takes out operations, then faults,
then each operation's waits and cancel, then VMs no operation names, as long as the replay
still breaks an invariant of the same kind (the message with its names and numbers blanked
out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from tests.unit.campaign.driver import Outcome, run
from tests.unit.campaign.schedule import Op, Schedule
from tests.unit.campaign.world import CampaignWorld

T = TypeVar("T")
MAX_TRIES = 400  # replays, at most, for one shrink
# An operation's parts that may not matter: its operator's cancel, its waits.
SIMPLER: list[Callable[[Op], Op]] = [
    lambda op: replace(op, cancel_at=None),
    lambda op: replace(op, gap_s=0.0),
    lambda op: replace(op, run_for=0),
]


def kind_of(violation: str) -> str:
    """What broke, without which VM, host, migration, request or epoch."""
    text = violation.split(": ", 1)[-1] if violation.startswith(("before", "after")) else violation
    text = re.sub(r"[0-9a-f]{32}", "M", text)
    text = re.sub(r"\b(vm|h)\d+\b", r"\1#", text)
    return re.sub(r"\d+(\.\d+)?", "#", text)


class Shrinker:
    def __init__(
        self,
        failing: Outcome,
        log: Callable[[str], None] | None = None,
        world: type[CampaignWorld] = CampaignWorld,
        max_tries: int = MAX_TRIES,
    ) -> None:
        self.kind = kind_of(failing.violations[0])
        self.tries, self.max_tries = 0, max_tries
        self.best = failing
        self.log = log or (lambda _msg: None)
        self.world = world

    def fails(self, schedule: Schedule) -> bool:
        if self.tries >= self.max_tries:
            return False
        self.tries += 1
        candidate = replace(schedule, ops=list(schedule.ops), faults=dict(schedule.faults))
        out = run(candidate, world=self.world)
        if any(kind_of(v) == self.kind for v in out.violations):
            if _size(out.schedule) < _size(self.best.schedule):
                self.best = out
                self.log(f"  {self.tries:3d}: {_size(out.schedule)} ({len(out.schedule.ops)} ops)")
            return True
        return False

    def shrink(self) -> Outcome:
        s = self.best.schedule
        if self.best.broke_at is not None and self.best.broke_at + 1 < len(s.ops):
            cut = replace(s, ops=s.ops[: self.best.broke_at + 1])
            if self.fails(cut):
                s = cut
        s = self._fewer_ops(s)
        # An operation needed only for the time it takes: a wait as long.
        s = self._each_op(s, lambda op: [Op("wait", run_for=op.run_for, gap_s=op.gap_s)])
        s = self._fewer_ops(s)
        keys = ddmin(sorted(s.faults), lambda keep: self.fails(_faults(s, keep)))
        s = _faults(s, keys)
        s = self._each_op(s, lambda op: [simpler(op) for simpler in SIMPLER])
        named = {op.vm for op in s.ops} | {v for op in s.ops for v in op.vms}
        for vm in [p.vm for p in s.placed if p.vm not in named]:
            fewer = replace(s, placed=[p for p in s.placed if p.vm != vm])
            if self.fails(fewer):
                s = fewer
        self.tries = 0  # the result's own run (never refused for the budget)
        out = run(s, world=self.world)
        return out if any(kind_of(v) == self.kind for v in out.violations) else self.best

    def _fewer_ops(self, s: Schedule) -> Schedule:
        return _ops(s, ddmin(list(range(len(s.ops))), lambda keep: self.fails(_ops(s, keep))))

    def _each_op(self, s: Schedule, options: Callable[[Op], list[Op]]) -> Schedule:
        """Each operation replaced by the first of its simpler ``options`` that still fails."""
        for i in range(len(s.ops)):
            for op in options(s.ops[i]):
                if op == s.ops[i]:
                    continue
                simpler = replace(s, ops=[*s.ops[:i], op, *s.ops[i + 1 :]])
                if self.fails(simpler):
                    s = simpler
        return s


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal subsequence of ``items`` for which ``fails`` holds (it holds for all)."""
    items, n = list(items), 2
    while len(items) >= 2:
        chunk = math.ceil(len(items) / n)
        for start in range(0, len(items), chunk):
            rest = items[:start] + items[start + chunk :]
            if fails(rest):
                items, n = rest, max(n - 1, 2)
                break
        else:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    if len(items) == 1 and fails([]):
        return []
    return items


def _ops(s: Schedule, keep: list[int]) -> Schedule:
    return replace(s, ops=[s.ops[i] for i in keep], faults=dict(s.faults))


def _faults(s: Schedule, keep: list[tuple[str, str, str, int]]) -> Schedule:
    return replace(s, ops=list(s.ops), faults={k: s.faults[k] for k in keep})


def _size(s: Schedule) -> int:
    return len(s.ops) + len(s.faults) + len(s.placed)
