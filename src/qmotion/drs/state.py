"""A mutable working copy of a snapshot: placements, loads, and O(1) imbalance deltas.

Imbalance is the root mean square of the population standard deviations of the hosts'
normalised CPU load (demand / capacity) and memory load (demand / capacity), over the hosts
that may hold VMs. Moving one VM changes two hosts, so the change of
sum((L - mean)^2) = sum(L^2) - (sum L)^2 / n is computed from two hosts' loads alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qmotion.drs.model import HostSpec, Snapshot, VmSpec


@dataclass
class HostLoad:
    spec: HostSpec
    cpu: float = 0.0  # demand, cores
    mem: float = 0.0  # demand, MiB
    allocated: int = 0  # memory_mib of the VMs placed here: never above capacity

    @property
    def cpu_load(self) -> float:
        return self.cpu / self.spec.cpu_capacity

    @property
    def mem_load(self) -> float:
        return self.mem / self.spec.memory_mib

    def fits(self, memory_mib: int) -> bool:
        return self.allocated + memory_mib <= self.spec.memory_mib


class ClusterState:
    # Weight of memory against CPU in the objective (not in the reported imbalance).
    mem_weight = 1.0

    def __init__(self, snap: Snapshot) -> None:
        self.hosts: dict[str, HostLoad] = {h.name: HostLoad(h) for h in snap.hosts}
        self.vms: dict[str, VmSpec] = {v.name: v for v in snap.vms}
        self.placement: dict[str, str] = {v.name: v.host for v in snap.vms}
        self.members: dict[str, set[str]] = {h: set() for h in self.hosts}
        for vm in snap.vms:
            self._add(vm, vm.host)
        # Balance is judged among hosts that can hold VMs; the others are being emptied.
        self.balanced = [name for name, h in self.hosts.items() if h.spec.usable]
        self._recompute()

    def _add(self, vm: VmSpec, host: str) -> None:
        h = self.hosts[host]
        h.cpu += vm.cpu
        h.mem += vm.mem_demand
        h.allocated += vm.memory_mib
        self.members[host].add(vm.name)

    def _remove(self, vm: VmSpec, host: str) -> None:
        h = self.hosts[host]
        h.cpu -= vm.cpu
        h.mem -= vm.mem_demand
        h.allocated -= vm.memory_mib
        self.members[host].discard(vm.name)

    def _recompute(self) -> None:
        hs = [self.hosts[n] for n in self.balanced]
        self.s1c = sum(h.cpu_load for h in hs)
        self.s2c = sum(h.cpu_load**2 for h in hs)
        self.s1m = sum(h.mem_load for h in hs)
        self.s2m = sum(h.mem_load**2 for h in hs)
        self._balanced_set = set(self.balanced)

    # ------------------------------------------------------------------ measures

    def objective(self) -> float:
        """n * (var_cpu + var_mem): what balancing minimises (independent of cluster size
        per move, unlike the standard deviation)."""
        n = len(self.balanced)
        if n == 0:
            return 0.0
        return (self.s2c - self.s1c**2 / n) + self.mem_weight * (self.s2m - self.s1m**2 / n)

    def imbalance(self) -> float:
        n = len(self.balanced)
        if n == 0:
            return 0.0
        var_c = max(self.s2c / n - (self.s1c / n) ** 2, 0.0)
        var_m = max(self.s2m / n - (self.s1m / n) ** 2, 0.0)
        return math.sqrt((var_c + var_m) / 2)

    def move_delta(self, cpu: float, mem: float, src: str, dst: str) -> float:
        """Change of the objective if ``cpu``/``mem`` demand moved from ``src`` to ``dst``."""
        n = len(self.balanced)
        if n == 0:
            return 0.0
        # Unrolled: this is the planner's innermost computation.
        d1c = d2c = d1m = d2m = 0.0
        bal = self._balanced_set
        if src in bal:
            h = self.hosts[src]
            oc, om = h.cpu / h.spec.cpu_capacity, h.mem / h.spec.memory_mib
            nc, nm = oc - cpu / h.spec.cpu_capacity, om - mem / h.spec.memory_mib
            d1c, d2c, d1m, d2m = nc - oc, nc * nc - oc * oc, nm - om, nm * nm - om * om
        if dst in bal:
            h = self.hosts[dst]
            oc, om = h.cpu / h.spec.cpu_capacity, h.mem / h.spec.memory_mib
            nc, nm = oc + cpu / h.spec.cpu_capacity, om + mem / h.spec.memory_mib
            d1c += nc - oc
            d2c += nc * nc - oc * oc
            d1m += nm - om
            d2m += nm * nm - om * om
        s1c, s1m = self.s1c, self.s1m
        # objective = s2 - s1^2/n per dimension; the change of it:
        return (d2c - (2 * s1c * d1c + d1c * d1c) / n) + self.mem_weight * (
            d2m - (2 * s1m * d1m + d1m * d1m) / n
        )

    # ------------------------------------------------------------------ changes

    def move(self, vm_name: str, dst: str) -> None:
        vm = self.vms[vm_name]
        src = self.placement[vm_name]
        for name, sign in ((src, -1.0), (dst, 1.0)):
            if name in self._balanced_set:
                h = self.hosts[name]
                self.s1c -= h.cpu_load
                self.s2c -= h.cpu_load**2
                self.s1m -= h.mem_load
                self.s2m -= h.mem_load**2
            if sign < 0:
                self._remove(vm, name)
            else:
                self._add(vm, name)
            if name in self._balanced_set:
                h = self.hosts[name]
                self.s1c += h.cpu_load
                self.s2c += h.cpu_load**2
                self.s1m += h.mem_load
                self.s2m += h.mem_load**2
        self.placement[vm_name] = dst

    def combined_load(self, host: str) -> float:
        h = self.hosts[host]
        return h.cpu_load + h.mem_load
