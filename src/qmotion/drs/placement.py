"""Placement of a new VM, and the targets of moving an existing one: hosts ranked. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from qmotion.drs.errors import SnapshotError
from qmotion.drs.model import Policy, Snapshot, VmSpec
from qmotion.drs.rules import RuleBook, validate
from qmotion.drs.state import ClusterState, HostLoad


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
    return _rank(state, RuleBook.build(snap), vm)


def rank_moves(snap: Snapshot, vm: str, policy: Policy) -> list[Candidate]:
    """Every host ranked for moving ``vm`` (in ``snap``) there, as ``place`` ranks a new VM on
    the cluster without it: its measured demand moves with it. Its current host is listed,
    never feasible ("current host"); the rules naming it count, a must-affinity too."""
    validate(snap)
    rest, spec = _taken_off(snap, vm)
    state = ClusterState(rest, policy.allocation_weight)
    return _rank(state, RuleBook.build(snap), spec, current=spec.host)


def load_after_move(snap: Snapshot, vm: str) -> dict[str, tuple[int, float]]:
    """Per host, with ``vm`` moved there (its own host: as now): the memory left free, MiB
    (negative when it does not fit), and the CPU demand per core, as ``rank_moves`` counts
    them (its "committed after placement" reason)."""
    rest, spec = _taken_off(snap, vm)
    state = ClusterState(rest)
    return {name: _after(h, spec) for name, h in state.hosts.items()}


def _taken_off(snap: Snapshot, vm: str) -> tuple[Snapshot, VmSpec]:
    """``snap`` without ``vm`` (its rules kept), and the VM."""
    spec = next((v for v in snap.vms if v.name == vm), None)
    if spec is None:
        raise SnapshotError(f"vm {vm}", "is not in the snapshot")
    # The cluster built without the VM rather than its load subtracted: the same arithmetic,
    # to the last bit, as place() on that cluster (the wizard and `drs place` agree).
    return snap.model_copy(update={"vms": [v for v in snap.vms if v.name != vm]}), spec


def _after(h: HostLoad, vm: VmSpec) -> tuple[int, float]:
    """``h``'s free memory (MiB) and CPU demand per core with ``vm`` on it."""
    return h.spec.memory_mib - h.allocated - vm.memory_mib, (h.cpu + vm.cpu) / h.spec.cpu_capacity


def _rank(
    state: ClusterState, book: RuleBook, vm: VmSpec, current: str | None = None
) -> list[Candidate]:
    """Every host of ``state`` (which lacks ``vm``) for ``vm``; ``current``: the host it is
    moved from (a move of one VM, not a placement)."""
    new = vm.model_copy(update={"host": "__new__"})
    state.vms[new.name] = new
    out = []
    for name in sorted(state.hosts):
        h = state.hosts[name]
        reasons = []
        feasible = True
        if name == current:
            feasible = False
            reasons.append("current host")
        if not h.spec.usable:
            feasible = False
            reasons.append("maintenance" if h.spec.maintenance else f"health {h.spec.health}")
        if not h.fits(new.memory_mib):
            feasible = False
            reasons.append(f"needs {new.memory_mib} MiB, {h.spec.memory_mib - h.allocated} free")
        state.placement[new.name] = name
        broken = book.would_break(state, [new.name], name, ("must", "should"))
        if current is not None:
            # The planner moves a must-affinity group as one unit (would_break leaves those
            # rules to it); one VM moved alone breaks the rule wherever its partners are not.
            broken += [
                r
                for r in book.by_vm.get(new.name, ())
                if r.kind == "affinity"
                and r.strength == "must"
                and any(state.placement[o] != name for o in r.vms if o != new.name)
            ]
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
            cpu = _after(h, new)[1]
            mem = (h.allocated + new.memory_mib) / h.spec.memory_mib
            reasons.append(f"CPU {cpu:.0%} and memory {mem:.0%} committed after placement")
        score = delta + (1.0 if any(r.strength == "should" for r in broken) else 0.0)
        out.append(Candidate(name, feasible, score, reasons))
    out.sort(key=lambda c: (not c.feasible, c.score, c.host))
    return out
