"""Placement of a new VM: every host, ranked, each with its reasons. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from qmotion.drs.model import Policy, Snapshot, VmSpec
from qmotion.drs.rules import RuleBook, validate
from qmotion.drs.state import ClusterState


@dataclass(frozen=True)
class Candidate:
    host: str
    feasible: bool
    score: float
    reasons: list[str]


def place(snap: Snapshot, vm: VmSpec, policy: Policy) -> list[Candidate]:
    """Ranked hosts for a new VM (``vm.host`` is ignored), each with its reasons."""
    validate(snap)
    state = ClusterState(snap, policy.allocation_weight)
    book = RuleBook.build(snap)
    new = vm.model_copy(update={"host": "__new__"})
    state.vms[new.name] = new
    out = []
    for name in sorted(state.hosts):
        h = state.hosts[name]
        reasons = []
        feasible = True
        if not h.spec.usable:
            feasible = False
            reasons.append("maintenance" if h.spec.maintenance else f"health {h.spec.health}")
        if not h.fits(new.memory_mib):
            feasible = False
            reasons.append(f"needs {new.memory_mib} MiB, {h.spec.memory_mib - h.allocated} free")
        state.placement[new.name] = name
        broken = book.would_break(state, [new.name], name, ("must", "should"))
        for r in broken:
            if r.strength == "must":
                feasible = False
            reasons.append(f"{r.strength} rule {r.name} forbids it")
        delta = 0.0
        if name in state.balanced:
            delta = state.move_delta(
                new.cpu, new.mem_demand, new.memory_mib, new.vcpus, "__none__", name
            )
        if feasible:
            cpu = (h.cpu + new.cpu) / h.spec.cpu_capacity
            mem = (h.allocated + new.memory_mib) / h.spec.memory_mib
            reasons.append(f"CPU {cpu:.0%} and memory {mem:.0%} committed after placement")
        score = delta + (1.0 if any(r.strength == "should" for r in broken) else 0.0)
        out.append(Candidate(name, feasible, score, reasons))
    out.sort(key=lambda c: (not c.feasible, c.score, c.host))
    return out
