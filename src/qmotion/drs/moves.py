"""The planner's answer: moves and plans, what a move costs and is worth, and its waves.

A plan's moves are priced (cost.py: the migration's predicted course) and ranked
(``priority_of``: the net gain each priority needs); the search's steps are collapsed to one
move per VM (``collapse``: the reason and priority of the step that caused it) and ordered into
waves within each host's concurrent-migration limit (``waves``: the longest moves first, so the
sources empty soonest).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qmotion.api.drs import Automation

# Net gain (reduction of the objective, see state.py; a 16 GiB VM moved from a host 10 points
# above the mean to one 10 points below gains about 0.012) that each priority needs.
PRIORITY_GAIN = {2: 0.05, 3: 0.01, 4: 0.003, 5: 1e-9}


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    target: str
    priority: int
    gain: float
    cost: float
    reason: str
    wave: int = 0
    auto_apply: bool = False
    seconds: float = 0.0  # the migration's predicted length

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "from": self.source,
            "to": self.target,
            "priority": self.priority,
            "gain": round(self.gain, 6),
            "cost": round(self.cost, 6),
            "reason": self.reason,
            "wave": self.wave,
            "auto_apply": self.auto_apply,
            "predicted_s": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Plan:
    moves: list[Move]
    imbalance_before: float
    imbalance_after: float
    threshold: int
    automation: Automation
    planned_at: datetime
    broken_should: list[dict[str, Any]] = field(default_factory=list)
    unplaced: list[dict[str, str]] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)
    # VMs balancing would have moved but left, each with why (a move the guest would notice).
    left: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "planned_at": self.planned_at.isoformat(),
            "threshold": self.threshold,
            "automation": self.automation.value,
            "imbalance_before": round(self.imbalance_before, 6),
            "imbalance_after": round(self.imbalance_after, 6),
            "moves": [m.to_json() for m in self.moves],
            "waves": max((m.wave for m in self.moves), default=-1) + 1,
            "broken_should_rules": self.broken_should,
            "unplaced": self.unplaced,
            "left": self.left,
        }


def priority_of(net: float) -> int:
    for p in (2, 3, 4, 5):
        if net >= PRIORITY_GAIN[p]:
            return p
    return 6


def collapse(steps: list[Move], seconds: dict[tuple[str, str], float] | None = None) -> list[Move]:
    """One move per VM, from where it is to where it ends (A->B->C is A->C), with the reason
    and priority of its most urgent step (a must repair that balancing later moved on is
    still a must repair); ``seconds``: each (VM, target)'s predicted length."""
    per_vm: dict[str, list[Move]] = {}
    for m in steps:
        per_vm.setdefault(m.vm, []).append(m)
    out = []
    for vm, mine in per_vm.items():
        a, b = mine[0], mine[-1]
        if a.source == b.target:
            continue
        why = min(mine, key=lambda x: x.priority)  # the first of the most urgent
        out.append(
            Move(
                vm,
                a.source,
                b.target,
                why.priority,
                sum(x.gain for x in mine),
                a.cost,
                why.reason,
                seconds=(seconds or {}).get((vm, b.target), 0.0),
            )
        )
    # Most urgent first, in the order the search made them: a move into a host that an
    # earlier move leaves may need the memory it frees (``waves`` keeps that order). Within a
    # priority, the moves into hosts nothing leaves need nothing freed: they go first, the
    # longest first, so the sources empty soonest (a long move started last would hold its
    # host alone at the end).
    out.sort(key=lambda m: m.priority)
    sources = {m.source for m in out}
    out.sort(
        key=lambda m: (m.priority, m.target in sources, 0.0 if m.target in sources else -m.seconds)
    )
    return out


def waves(moves: list[Move], limits: dict[str, int]) -> list[Move]:
    """Each migration uses a slot on its source and its target in its wave; a move into a host
    that an earlier move empties waits for that wave (it may need the freed memory)."""
    used: dict[tuple[int, str], int] = defaultdict(int)
    freed: dict[str, int] = {}
    out = []
    for m in moves:
        w = freed.get(m.target, -1) + 1
        while used[(w, m.source)] >= limits.get(m.source, 4) or used[(w, m.target)] >= limits.get(
            m.target, 4
        ):
            w += 1
        used[(w, m.source)] += 1
        used[(w, m.target)] += 1
        freed[m.source] = max(freed.get(m.source, -1), w)
        out.append(
            Move(
                m.vm, m.source, m.target, m.priority, m.gain, m.cost, m.reason, w, False, m.seconds
            )
        )
    return out
