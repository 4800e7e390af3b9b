"""The planner's answer: moves and plans, what a move costs and is worth, and its waves.

A plan's moves are priced (``cost_of``: memory to copy and pages to re-copy) and ranked
(``priority_of``: the net gain each priority needs); the search's steps are collapsed to one
move per VM (``collapse``) and ordered into waves within each host's concurrent-migration limit
(``waves``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qmotion.api.drs import Automation
from qmotion.drs.model import VmSpec

# Net gain (reduction of the objective, see state.py) that each priority needs.
PRIORITY_GAIN = {2: 0.05, 3: 0.01, 4: 0.003, 5: 1e-9}
# Migration cost in objective units (n x variance of normalised load; a 16 GiB VM moved from a
# host 10 points above the mean to one 10 points below gains about 0.012): a fixed part plus
# memory to copy and pages to re-copy. Small enough that aggressive thresholds reach the fine
# balance hbal reaches (bench/drs.py), large enough that a move must gain more than noise.
COST_BASE = 0.00001
COST_PER_GIB = 0.000002
COST_PER_DIRTY_MIB_S = 0.000004


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
        }


def cost_of(vms: list[VmSpec]) -> float:
    return sum(
        COST_BASE + COST_PER_GIB * v.memory_mib / 1024 + COST_PER_DIRTY_MIB_S * v.dirty_rate_mib_s
        for v in vms
    )


def priority_of(net: float) -> int:
    for p in (2, 3, 4, 5):
        if net >= PRIORITY_GAIN[p]:
            return p
    return 6


def collapse(steps: list[Move]) -> list[Move]:
    """One move per VM, from where it is to where it ends (A->B->C is A->C)."""
    per_vm: dict[str, list[Move]] = {}
    for m in steps:
        per_vm.setdefault(m.vm, []).append(m)
    out = []
    for vm, mine in per_vm.items():
        a, b = mine[0], mine[-1]
        if a.source == b.target:
            continue
        out.append(
            Move(
                vm,
                a.source,
                b.target,
                min(x.priority for x in mine),
                sum(x.gain for x in mine),
                a.cost,
                a.reason,
            )
        )
    out.sort(key=lambda m: m.priority)
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
        out.append(Move(m.vm, m.source, m.target, m.priority, m.gain, m.cost, m.reason, w))
    return out
