"""A mutable working copy of a snapshot: placements, loads, and O(1) imbalance deltas.

Imbalance is the root mean square of the population standard deviations of the hosts'
normalised CPU load (demand / capacity) and memory load (demand / capacity), over the hosts
that may hold VMs. The planner's objective adds, with a smaller weight, how evenly memory is
allocated (allocated / capacity) and vCPUs are committed (vCPUs / cores): headroom for new VMs
and evacuations then spreads too. Moving one VM changes two hosts, so the change of
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
    vcpus: int = 0

    @property
    def cpu_load(self) -> float:
        return self.cpu / self.spec.cpu_capacity

    @property
    def mem_load(self) -> float:
        return self.mem / self.spec.memory_mib

    @property
    def alloc_load(self) -> float:
        return self.allocated / self.spec.memory_mib

    @property
    def vcpu_load(self) -> float:
        return self.vcpus / self.spec.cpu_capacity

    def fits(self, memory_mib: int) -> bool:
        return self.allocated + memory_mib <= self.spec.memory_mib


class ClusterState:
    # Weight of memory against CPU in the objective (not in the reported imbalance).
    mem_weight = 1.0

    def __init__(self, snap: Snapshot, alloc_weight: float = 0.0) -> None:
        # Weight of allocated memory and committed vCPUs in the objective (see the docstring).
        self.alloc_weight = alloc_weight
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
        h.vcpus += vm.vcpus
        self.members[host].add(vm.name)

    def _remove(self, vm: VmSpec, host: str) -> None:
        h = self.hosts[host]
        h.cpu -= vm.cpu
        h.mem -= vm.mem_demand
        h.allocated -= vm.memory_mib
        h.vcpus -= vm.vcpus
        self.members[host].discard(vm.name)

    def _recompute(self) -> None:
        hs = [self.hosts[n] for n in self.balanced]
        self.s1c = sum(h.cpu_load for h in hs)
        self.s2c = sum(h.cpu_load**2 for h in hs)
        self.s1m = sum(h.mem_load for h in hs)
        self.s2m = sum(h.mem_load**2 for h in hs)
        self.s1a = sum(h.alloc_load for h in hs)
        self.s2a = sum(h.alloc_load**2 for h in hs)
        self.s1v = sum(h.vcpu_load for h in hs)
        self.s2v = sum(h.vcpu_load**2 for h in hs)
        self._balanced_set = set(self.balanced)

    # ------------------------------------------------------------------ measures

    def objective(self) -> float:
        """n x the weighted sum of the variances: what balancing minimises (independent of
        cluster size per move, unlike the standard deviation)."""
        n = len(self.balanced)
        if n == 0:
            return 0.0
        demand = (self.s2c - self.s1c**2 / n) + self.mem_weight * (self.s2m - self.s1m**2 / n)
        alloc = (self.s2a - self.s1a**2 / n) + (self.s2v - self.s1v**2 / n)
        return demand + self.alloc_weight * alloc

    def imbalance(self) -> float:
        n = len(self.balanced)
        if n == 0:
            return 0.0
        var_c = max(self.s2c / n - (self.s1c / n) ** 2, 0.0)
        var_m = max(self.s2m / n - (self.s1m / n) ** 2, 0.0)
        return math.sqrt((var_c + var_m) / 2)

    def move_delta(
        self, cpu: float, mem: float, mib: float, vcpus: float, src: str, dst: str
    ) -> float:
        """Change of the objective if ``cpu``/``mem`` demand, ``mib`` allocated memory and
        ``vcpus`` moved from ``src`` to ``dst``."""
        n = len(self.balanced)
        if n == 0:
            return 0.0
        # Per dimension, with a and b the load leaving the source and reaching the target and
        # o the hosts' loads: d1 = b - a, d2 = a(a - 2 o_src) + b(b + 2 o_dst); the objective
        # changes by d2 - d1 (2 s1 + d1) / n. A host outside the balanced set adds nothing.
        bal = self._balanced_set
        ac = am = aa = av = bc = bm = ba = bv = 0.0
        ocs = oms = oas = ovs = ocd = omd = oad = ovd = 0.0
        if src in bal:
            h = self.hosts[src]
            ic, im = 1.0 / h.spec.cpu_capacity, 1.0 / h.spec.memory_mib
            ac, am, aa, av = cpu * ic, mem * im, mib * im, vcpus * ic
            ocs, oms, oas, ovs = h.cpu * ic, h.mem * im, h.allocated * im, h.vcpus * ic
        if dst in bal:
            h = self.hosts[dst]
            ic, im = 1.0 / h.spec.cpu_capacity, 1.0 / h.spec.memory_mib
            bc, bm, ba, bv = cpu * ic, mem * im, mib * im, vcpus * ic
            ocd, omd, oad, ovd = h.cpu * ic, h.mem * im, h.allocated * im, h.vcpus * ic
        d1 = bc - ac
        delta = ac * (ac - 2 * ocs) + bc * (bc + 2 * ocd) - d1 * (2 * self.s1c + d1) / n
        d1 = bm - am
        delta += self.mem_weight * (
            am * (am - 2 * oms) + bm * (bm + 2 * omd) - d1 * (2 * self.s1m + d1) / n
        )
        if not self.alloc_weight:
            return delta
        d1 = ba - aa
        alloc = aa * (aa - 2 * oas) + ba * (ba + 2 * oad) - d1 * (2 * self.s1a + d1) / n
        d1 = bv - av
        alloc += av * (av - 2 * ovs) + bv * (bv + 2 * ovd) - d1 * (2 * self.s1v + d1) / n
        return delta + self.alloc_weight * alloc

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
                self.s1a -= h.alloc_load
                self.s2a -= h.alloc_load**2
                self.s1v -= h.vcpu_load
                self.s2v -= h.vcpu_load**2
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
                self.s1a += h.alloc_load
                self.s2a += h.alloc_load**2
                self.s1v += h.vcpu_load
                self.s2v += h.vcpu_load**2
        self.placement[vm_name] = dst
