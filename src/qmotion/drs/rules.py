"""Snapshot validation and the placement rules: what may go where, and what is broken now."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qmotion.drs.errors import SnapshotError
from qmotion.drs.model import Rule, Snapshot
from qmotion.drs.state import ClusterState


def validate(snap: Snapshot) -> None:
    """Refuse, naming the entry, a snapshot no plan can be made from."""
    hosts = set()
    for h in snap.hosts:
        if h.name in hosts:
            raise SnapshotError(f"host {h.name}", "defined twice")
        hosts.add(h.name)
    vms = set()
    for v in snap.vms:
        if v.name in vms:
            raise SnapshotError(f"vm {v.name}", "defined twice")
        vms.add(v.name)
        if v.host not in hosts:
            raise SnapshotError(f"vm {v.name}", f"runs on unknown host {v.host!r}")
    names = set()
    for r in snap.rules:
        if r.name in names:
            raise SnapshotError(f"rule {r.name}", "defined twice")
        names.add(r.name)
        for vm in r.vms:
            if vm not in vms:
                raise SnapshotError(f"rule {r.name}", f"names unknown VM {vm!r}")
        for host in r.hosts:
            if host not in hosts:
                raise SnapshotError(f"rule {r.name}", f"names unknown host {host!r}")
    _contradictions(snap, hosts)


def _contradictions(snap: Snapshot, hosts: set[str]) -> None:
    must = [r for r in snap.rules if r.strength == "must"]
    allowed: dict[str, set[str]] = {}
    why: dict[str, list[str]] = defaultdict(list)
    for r in must:
        for vm in r.vms:
            if r.kind == "run_on":
                allowed[vm] = allowed.get(vm, set(hosts)) & set(r.hosts)
                why[vm].append(r.name)
            elif r.kind == "not_run_on":
                allowed[vm] = allowed.get(vm, set(hosts)) - set(r.hosts)
                why[vm].append(r.name)
    for vm, ok in allowed.items():
        if not ok:
            raise SnapshotError(
                f"rules {', '.join(why[vm])}", f"together leave VM {vm} no host to run on"
            )
    # Must-affinity rules sharing a VM chain into one group that must share a host.
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    affinity = [r for r in must if r.kind == "affinity"]
    for r in affinity:
        for vm in r.vms[1:]:
            root, other = find(r.vms[0]), find(vm)
            if root != other:
                parent[other] = root
    group_rules: dict[str, list[str]] = defaultdict(list)
    for r in affinity:
        group_rules[find(r.vms[0])].append(r.name)
    for b in (r for r in must if r.kind == "anti_affinity"):
        seen: dict[str, str] = {}
        for vm in b.vms:
            g = find(vm)
            if g in seen and g in group_rules:
                raise SnapshotError(
                    f"rules {', '.join(group_rules[g])}, {b.name}",
                    f"VMs {seen[g]}, {vm} must be both together and apart",
                )
            seen.setdefault(g, vm)
        if len(b.vms) > len(hosts):
            raise SnapshotError(
                f"rule {b.name}", f"keeps {len(b.vms)} VMs apart on {len(hosts)} hosts"
            )
        options = [allowed.get(vm, set(hosts)) for vm in b.vms]
        if not _distinct_hosts(options):
            names = sorted({b.name, *(n for vm in b.vms for n in why.get(vm, []))})
            raise SnapshotError(
                f"rules {', '.join(names)}",
                f"leave VMs {', '.join(b.vms)} no distinct hosts to be kept apart on",
            )
    group_hosts: dict[str, set[str]] = {}
    group_why: dict[str, list[str]] = defaultdict(list)
    for vm in {vm for r in affinity for vm in r.vms}:
        g = find(vm)
        group_hosts[g] = group_hosts.get(g, set(hosts)) & allowed.get(vm, set(hosts))
        group_why[g] += why.get(vm, [])
    for g, ok in group_hosts.items():
        if not ok:
            names = sorted(set(group_rules[g] + group_why[g]))
            raise SnapshotError(
                f"rules {', '.join(names)}",
                "the VMs must share a host but their host rules allow none",
            )


def _distinct_hosts(options: list[set[str]]) -> bool:
    """Whether each VM can have its own host from its allowed set (bipartite matching)."""
    owner: dict[str, int] = {}

    def assign(i: int, seen: set[str]) -> bool:
        for h in sorted(options[i]):
            if h in seen:
                continue
            seen.add(h)
            if h not in owner or assign(owner[h], seen):
                owner[h] = i
                return True
        return False

    return all(assign(i, set()) for i in range(len(options)))


@dataclass
class RuleBook:
    """Rules indexed by VM, for checks in the planner's inner loop."""

    by_vm: dict[str, list[Rule]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # must-affinity: vm -> group

    @classmethod
    def build(cls, snap: Snapshot) -> RuleBook:
        book = cls()
        for r in snap.rules:
            for vm in r.vms:
                book.by_vm.setdefault(vm, []).append(r)
        # Must-affinity groups move as one unit; overlapping groups merge.
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        for r in snap.rules:
            if r.kind == "affinity" and r.strength == "must":
                root = find(r.vms[0])
                for vm in r.vms[1:]:
                    parent[find(vm)] = root
        members: dict[str, list[str]] = defaultdict(list)
        for vm in {
            vm for r in snap.rules if r.kind == "affinity" and r.strength == "must" for vm in r.vms
        }:
            members[find(vm)].append(vm)
        for group in members.values():
            group.sort()
            for vm in group:
                book.groups[vm] = group
        return book

    def unit(self, vm: str) -> list[str]:
        return self.groups.get(vm, [vm])

    def hosts_for(
        self, state: ClusterState, unit: list[str], strengths: tuple[str, ...]
    ) -> set[str] | None:
        """The hosts ``allows`` could accept for ``unit`` (a superset; None: any host). Run-on
        rules name them; a should-affinity rule leaves only its other members' hosts."""
        out: set[str] | None = None
        unit_set = set(unit)
        for vm in unit:
            for r in self.by_vm.get(vm, ()):
                if r.strength not in strengths:
                    continue
                if r.kind == "run_on":
                    hosts = set(r.hosts)
                elif r.kind == "affinity" and r.strength == "should":
                    hosts = {state.placement[o] for o in r.vms if o not in unit_set}
                    if not hosts:
                        continue
                else:
                    continue
                out = hosts if out is None else out & hosts
        return out

    def would_break(
        self, state: ClusterState, unit: list[str], host: str, strengths: tuple[str, ...]
    ) -> list[Rule]:
        """The rules (of the given strengths) that moving ``unit`` to ``host`` would break."""
        broken: list[Rule] = []
        unit_set = set(unit)
        for vm in unit:
            for r in self.by_vm.get(vm, ()):
                if r.strength not in strengths:
                    continue
                if (r.kind == "run_on" and host not in r.hosts) or (
                    r.kind == "not_run_on" and host in r.hosts
                ):
                    broken.append(r)
                elif r.kind == "anti_affinity":
                    others = [o for o in r.vms if o not in unit_set]
                    if any(state.placement[o] == host for o in others):
                        broken.append(r)
                elif r.kind == "affinity" and r.strength == "should":
                    # A move may bring the members closer together, never further apart.
                    before = {state.placement[o] for o in r.vms}
                    after = {host if o in unit_set else state.placement[o] for o in r.vms}
                    if len(after) > 1 and len(after) >= len(before):
                        broken.append(r)
        return broken

    def violations(self, state: ClusterState, rules: list[Rule]) -> list[tuple[Rule, list[str]]]:
        """Rules broken by the current placement, with the VMs that break them."""
        out = []
        for r in rules:
            bad: list[str] = []
            if r.kind == "run_on":
                bad = [vm for vm in r.vms if state.placement[vm] not in r.hosts]
            elif r.kind == "not_run_on":
                bad = [vm for vm in r.vms if state.placement[vm] in r.hosts]
            elif r.kind == "anti_affinity":
                seen: dict[str, str] = {}
                for vm in r.vms:
                    host = state.placement[vm]
                    if host in seen:
                        bad.append(vm)
                    seen.setdefault(host, vm)
            elif r.kind == "affinity":
                hosts = {state.placement[vm] for vm in r.vms}
                if len(hosts) > 1:
                    first = state.placement[r.vms[0]]
                    bad = [vm for vm in r.vms if state.placement[vm] != first]
            if bad:
                out.append((r, bad))
        return out


def broken_by_move(
    rules: Sequence[Rule],
    placement: Mapping[str, str],
    vm: str,
    host: str,
    strengths: tuple[str, ...] = ("must",),
) -> list[Rule]:
    """The rules (must ones by default) that ``vm`` on ``host`` would break, the others where
    ``placement`` puts them (a VM not in it, such as one being created, is placed by this).
    Members missing from ``placement`` are ignored: a rule may name a VM not created yet."""
    broken = []
    for r in rules:
        if r.strength not in strengths or vm not in r.vms:
            continue
        others = [placement[o] for o in r.vms if o != vm and o in placement]
        if (
            (r.kind == "run_on" and host not in r.hosts)
            or (r.kind == "not_run_on" and host in r.hosts)
            or (r.kind == "anti_affinity" and host in others)
            or (r.kind == "affinity" and any(o != host for o in others))
        ):
            broken.append(r)
    return broken
