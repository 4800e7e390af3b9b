"""The DRS planner: mandatory moves, then cost-aware load balancing, ordered into waves.

Pipeline (as Nomad's scheduler: reconcile, feasibility, score, plan):
  1. validate the snapshot (refuse contradictory must rules, unknown hosts, bad capacities);
  2. mandatory moves, priority 1: VMs on failed, quarantined or maintenance hosts, VMs breaking
     a must rule; priority 2: VMs on degraded hosts and VMs breaking a should rule. Each goes to
     the feasible host that leaves the cluster most balanced, so an evacuated host's VMs spread;
  3. balancing, priorities 2-5: repeatedly the single move with the best gain in balance net of
     its migration cost (which grows with the VM's memory and dirty rate), among the most and
     least loaded hosts (passing over VMs that rules hold or that do not fit), until no move
     reaches the threshold's priority or Policy.max_moves is spent. Because the stop rule
     depends only on the state, planning again on an uncapped result yields no move;
  4. waves: moves ordered so no host exceeds its concurrent-migration limit.
Never overcommits memory, never targets a host that is not usable, never breaks a must rule,
breaks a should rule only for a mandatory move with no alternative (and reports it).
Deterministic: ties are broken by name.
The plan's value types, the cost and priority of a move and the waves are in moves.py; the
placement of a new VM in placement.py.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from datetime import datetime
from typing import Any

from qmotion.api.drs import Automation
from qmotion.drs.model import Health, Policy, Snapshot
from qmotion.drs.moves import Move, Plan, collapse, cost_of, priority_of, waves
from qmotion.drs.rules import RuleBook, validate
from qmotion.drs.state import ClusterState

# Candidate moves per step: VMs (NEIGHBOURS either side of the ideal size) from the SOURCES
# most loaded hosts to the TARGETS least loaded ones. Measured on skewed 20-host clusters,
# searching every host found plans of the same quality at four times the runtime.
SOURCES, TARGETS, NEIGHBOURS = 3, 5, 3
# Up to this many hosts every source and target pair is tried, with this many VMs either side.
SMALL_CLUSTER, NEIGHBOURS_SMALL = 32, 12
# Past units it cannot move, the search looks at most this many times NEIGHBOURS further.
SCAN = 8
# Exchanging the destinations of moved VMs (see _Planner.polish): among at most this many
# moved VMs (the pairs grow as the square), this many sweeps, gains above rounding noise.
POLISH_MAX, POLISH_SWEEPS, POLISH_MIN_GAIN = 400, 8, 1e-7
# Even allocation is secondary: a balancing move or exchange never makes demand less even
# (beyond rounding), so balancing never raises the imbalance.
DEMAND_SLACK = 1e-12


class _Planner:
    def __init__(self, snap: Snapshot, policy: Policy) -> None:
        validate(snap)
        self.snap, self.policy = snap, policy
        self.state = ClusterState(snap, policy.allocation_weight)
        self.book = RuleBook.build(snap)
        self.steps: list[Move] = []
        self.broken: list[dict[str, Any]] = []
        self.unplaced: list[dict[str, str]] = []
        self._infos: dict[str, tuple[float, float, int, int, float]] = {}
        self.origin = {v.name: v.host for v in snap.vms}
        # VMs a mandatory move took: Policy.max_moves never holds those back.
        self.required: set[str] = set()
        # Whether the rules let a unit (by its leader) go to a host, as balancing asks it
        # again and again; dropped for a unit when it or a VM sharing a rule with it moves.
        self._allowed: dict[str, dict[str, bool]] = {}

    # ------------------------------------------------------------------ helpers

    def _unit_demand(self, unit: list[str]) -> tuple[float, float, int, int]:
        """(CPU demand, memory demand, memory MiB, vCPUs) of the unit."""
        cpu, mem, mib, vcpus, _ = self._info(unit[0])
        return cpu, mem, mib, vcpus

    def _feasible(self, unit: list[str], host: str, strengths: tuple[str, ...]) -> bool:
        h = self.state.hosts[host]
        if not h.spec.usable:
            return False
        placement = self.state.placement
        if len(unit) == 1:
            # The common case, kept cheap: it runs in the balancer's inner loop.
            vm = unit[0]
            if placement[vm] == host or not h.fits(self.state.vms[vm].memory_mib):
                return False
            if vm not in self.book.by_vm:
                return True
        else:
            src = {placement[v] for v in unit}
            need = sum(self.state.vms[v].memory_mib for v in unit if placement[v] != host)
            if src == {host} or not h.fits(need):
                return False
        return not self.book.would_break(self.state, unit, host, strengths)

    def _rules_allow(self, key: str, host: str) -> bool:
        """The rules (must and should) let the unit led by ``key`` move to ``host``."""
        per = self._allowed.get(key)
        if per is None:
            per = self._allowed[key] = {}
        ok = per.get(host)
        if ok is None:
            unit = self.book.unit(key)
            ok = per[host] = not self.book.would_break(self.state, unit, host, ("must", "should"))
        return ok

    def _apply(
        self, unit: list[str], host: str, priority: int, gain: float, cost: float, reason: str
    ) -> None:
        for vm in unit:
            src = self.state.placement[vm]
            if src == host:
                continue
            for rule in self.book.by_vm.get(vm, ()):
                for other in rule.vms:
                    self._allowed.pop(self.book.unit(other)[0], None)
            self.state.move(vm, host)
            self.steps.append(
                Move(vm, src, host, priority, gain / len(unit), cost / len(unit), reason)
            )

    def _best_target(self, unit: list[str], strengths: tuple[str, ...]) -> tuple[str, float] | None:
        cpu, mem, mib, vcpus = self._unit_demand(unit)
        src = self.state.placement[unit[0]]
        # Only the hosts the unit's rules leave (on a large cluster an affinity rule leaves
        # one of a thousand), best first; then the first that passes every test.
        allowed = self.book.hosts_for(self.state, unit, strengths)
        hosts = self.state.hosts
        ranked = sorted(
            (self.state.move_delta(cpu, mem, mib, vcpus, src, name), name)
            for name in (hosts if allowed is None else allowed & hosts.keys())
            if hosts[name].spec.usable
        )
        for delta, host in ranked:
            if self._feasible(unit, host, strengths):
                return host, delta
        return None

    # ------------------------------------------------------------------ mandatory

    def mandatory(self) -> None:
        # Each unit once, at its most urgent reason: a VM on a degraded host (2) that also
        # breaks a must rule (1) is a must repair, labelled so, whatever the threshold.
        wanted: dict[str, tuple[int, str, list[str], list[list[str]]]] = {}

        def want(prio: int, reason: str, unit: list[str], alts: list[list[str]]) -> None:
            cur = wanted.get(unit[0])
            if cur is None or prio < cur[0]:
                wanted[unit[0]] = (prio, reason, unit, alts)

        for vm_name in sorted(self.state.vms):
            spec = self.state.hosts[self.state.placement[vm_name]].spec
            unit = self.book.unit(vm_name)
            if spec.health in (Health.FAILED, Health.QUARANTINED):
                want(1, f"host {spec.name} is {spec.health.value}", unit, [])
            elif spec.maintenance:
                want(1, f"host {spec.name} enters maintenance", unit, [])
            elif spec.health == Health.DEGRADED:
                want(2, f"host {spec.name} is degraded", unit, [])
        # Rule violations: must first, then should.
        for strength, prio in (("must", 1), ("should", 2)):
            rules = [r for r in self.snap.rules if r.strength == strength]
            for rule, bad in self.book.violations(self.state, rules):
                for vm in bad:
                    # Two anti-affine VMs together: moving either repairs it (the other is
                    # tried when this one cannot go, pinned by a cool-down or a rule).
                    alts = []
                    if rule.kind == "anti_affinity":
                        here = self.state.placement[vm]
                        alts = [
                            self.book.unit(o)
                            for o in rule.vms
                            if o != vm and self.state.placement[o] == here
                        ]
                    want(prio, f"{strength} rule {rule.name} is broken", self.book.unit(vm), alts)
        units = list(wanted.values())
        # Large units first: they are the hardest to fit.
        units.sort(key=lambda u: (u[0], -self._unit_demand(u[2])[2], u[2][0]))
        for prio, reason, first, alts in units:
            if prio > self.policy.threshold and prio == 2:
                continue
            unit = first  # or, for an anti-affinity repair, the partner that can move
            if any(self.state.placement[v] != self.origin[v] for v in unit):
                continue  # moved already, as another unit's alternative
            found = self._best_target(unit, ("must", "should"))
            if found is None and alts:
                for alt in alts:
                    if any(self.state.placement[v] != self.origin[v] for v in alt):
                        break  # the partner moved already
                    if (alt_found := self._best_target(alt, ("must", "should"))) is not None:
                        unit, found = alt, alt_found
                        break
                mine = [r for r in self.snap.rules if any(v in r.vms for v in unit)]
                if found is None and not self.book.violations(self.state, mine):
                    continue  # a partner's move repaired it
            note = reason
            if found is None and prio == 1:
                found = self._best_target(unit, ("must",))
                if found is not None:
                    broken = self.book.would_break(self.state, unit, found[0], ("should",))
                    for r in broken:
                        self.broken.append(
                            {
                                "rule": r.name,
                                "vms": unit,
                                "host": found[0],
                                "why": f"no other host fits ({reason})",
                            }
                        )
                    note = f"{reason}; breaks should rule(s) " + ", ".join(r.name for r in broken)
            if found is None:
                for vm in unit:
                    self.unplaced.append({"vm": vm, "reason": f"{reason}; no feasible host"})
                continue
            host, delta = found
            self.required.update(unit)
            self._apply(unit, host, prio, -delta, self._info(unit[0])[4], note)

    # ------------------------------------------------------------------ balancing

    def balance(self) -> None:
        st = self.state
        usable = [h for h in st.balanced]
        if len(usable) < 2 or self.policy.threshold < 2:
            return
        by_cpu = sorted((st.hosts[h].cpu_load, h) for h in usable)
        by_mem = sorted((st.hosts[h].mem_load, h) for h in usable)
        # Per host, its movable units sorted by their normalised weight on that host.
        weights: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for host in usable:
            units = {tuple(self.book.unit(v)) for v in st.members[host]}
            weights[host] = sorted(
                (self._weight(list(u), host), u[0])
                for u in units
                if all(st.placement[v] == host for v in u)
            )
        origin, required = self.origin, self.required
        # Policy.max_moves counts VMs away from home in the final plan: moving a VM again
        # costs nothing more, sending one home gives a move back.
        budget = self.policy.max_moves - sum(
            1 for v, h in st.placement.items() if h != origin[v] and v not in required
        )
        while True:
            best = self._best_balancing_move(by_cpu, by_mem, weights)
            if best is None:
                break
            net, unit, src, dst, gain, cost = best
            prio = priority_of(net)
            if prio > self.policy.threshold:
                break
            added = sum(
                (dst != origin[v]) - (st.placement[v] != origin[v])
                for v in unit
                if v not in required
            )
            if added > budget:
                break
            budget -= added
            for lst in (by_cpu, by_mem):
                for host in (src, dst):
                    key = (
                        st.hosts[host].cpu_load if lst is by_cpu else st.hosts[host].mem_load,
                        host,
                    )
                    lst.pop(bisect.bisect_left(lst, key))
            weights[src].remove((self._weight(unit, src), unit[0]))
            self._apply(unit, dst, prio, gain, cost, "balance load")
            bisect.insort(weights[dst], (self._weight(unit, dst), unit[0]))
            for host in (src, dst):
                bisect.insort(by_cpu, (st.hosts[host].cpu_load, host))
                bisect.insort(by_mem, (st.hosts[host].mem_load, host))

    def _weight(self, unit: list[str], host: str) -> float:
        cpu, mem, _, _ = self._unit_demand(unit)
        h = self.state.hosts[host].spec
        return cpu / h.cpu_capacity + mem / h.memory_mib

    def polish(self) -> bool:
        """Exchange the destinations of two VMs this plan already moves when that balances
        better: fine tuning that adds no migration (and a VM sent back home saves one).
        Sweeps until no exchange helps; returns whether anything changed."""
        st = self.state
        if self.policy.threshold < 2:
            return False
        rules, groups, origin = self.book.by_vm, self.book.groups, self.origin
        balanced = set(st.balanced)
        moved = sorted(
            v
            for v, h in st.placement.items()
            if h != origin[v] and h in balanced and v not in rules and v not in groups
        )
        if len(moved) > POLISH_MAX:
            # The pairs grow as the square: fine-tune the VMs on the hosts farthest from the
            # mean load, where an exchange gains most.
            mc, mm = st.s1c / len(st.balanced), st.s1m / len(st.balanced)

            def off(v: str) -> float:
                h = st.hosts[st.placement[v]]
                return abs(h.cpu_load - mc) + abs(h.mem_load - mm)

            moved = sorted(sorted(moved, key=lambda v: (-off(v), v))[:POLISH_MAX])
        if len(moved) < 2:
            return False
        n = len(st.balanced)
        w, aw = st.mem_weight, st.alloc_weight
        info = self._info
        # Per host: reciprocal capacities, loads and free memory, refreshed after exchanges.
        hosts: dict[str, tuple[float, ...]] = {}

        def refresh(name: str) -> None:
            h = st.hosts[name]
            ic, im = 1.0 / h.spec.cpu_capacity, 1.0 / h.spec.memory_mib
            hosts[name] = (
                ic,
                im,
                2 * h.cpu * ic,
                2 * h.mem * im,
                2 * h.allocated * im,
                2 * h.vcpus * ic,
                h.spec.memory_mib - h.allocated,
            )

        for name in balanced:
            refresh(name)
        changed = False
        for _ in range(POLISH_SWEEPS):
            improved = False
            for i, x in enumerate(moved):
                hx = st.placement[x]
                cx, mx, bx, vx, kx = info(x)
                icx, imx, tcx, tmx, tax, tvx, roomx = hosts[hx]
                kc, km = 2 * st.s1c / n, 2 * st.s1m / n
                ka, kv = 2 * st.s1a / n, 2 * st.s1v / n
                best: tuple[float, str] | None = None
                for y in moved[i + 1 :]:
                    hy = st.placement[y]
                    if hy == hx:
                        continue
                    cy, my, by, vy, ky = info(y)
                    icy, imy, tcy, tmy, tay, tvy, roomy = hosts[hy]
                    # The exchange moves the difference of the two VMs from hx to hy; the
                    # objective's change as in ClusterState.move_delta, inline for speed.
                    db, dv = bx - by, vx - vy
                    if db > roomy or -db > roomx:
                        continue
                    a, b = db * imx, db * imy
                    d1 = b - a
                    alloc = a * (a - tax) + b * (b + tay) - d1 * (ka + d1 / n)
                    a, b = dv * icx, dv * icy
                    d1 = b - a
                    alloc += a * (a - tvx) + b * (b + tvy) - d1 * (kv + d1 / n)
                    t = cx - cy
                    a, b = t * icx, t * icy
                    d1 = b - a
                    delta = a * (a - tcx) + b * (b + tcy) - d1 * (kc + d1 / n)
                    t = mx - my
                    a, b = t * imx, t * imy
                    d1 = b - a
                    delta += w * (a * (a - tmx) + b * (b + tmy) - d1 * (km + d1 / n))
                    if aw and delta > DEMAND_SLACK:
                        continue
                    gain = -delta - aw * alloc
                    gain += (kx if hy == origin[x] else 0.0) + (ky if hx == origin[y] else 0.0)
                    if gain > POLISH_MIN_GAIN and (best is None or gain > best[0]):
                        best = (gain, y)
                if best is None:
                    continue
                gain, y = best
                hy = st.placement[y]
                st.move(x, hy)
                st.move(y, hx)
                refresh(hx)
                refresh(hy)
                prio = priority_of(gain)
                self.steps.append(Move(x, hx, hy, prio, gain / 2, 0.0, "balance load"))
                self.steps.append(Move(y, hy, hx, prio, gain / 2, 0.0, "balance load"))
                improved = changed = True
            if not improved:
                break
        return changed

    def _widths(self) -> tuple[int, int, int]:
        """How many source hosts, target hosts and VMs either side of the ideal size to try.

        Small clusters are searched (nearly) whole: the end of balancing needs precise moves
        that a narrow search misses. Large ones use a narrow window, which on skewed
        1 000-host clusters gave plans as good at a fraction of the time.
        """
        n = len(self.state.balanced)
        if n <= SMALL_CLUSTER:
            return n, n, NEIGHBOURS_SMALL
        return SOURCES, TARGETS, NEIGHBOURS

    def _info(self, key: str) -> tuple[float, float, int, int, float]:
        """(CPU demand, memory demand, memory MiB, vCPUs, migration cost) of the unit led by
        ``key``."""
        info = self._infos.get(key)
        if info is None:
            vms = [self.state.vms[v] for v in self.book.unit(key)]
            info = self._infos[key] = (
                sum(v.cpu for v in vms),
                sum(v.mem_demand for v in vms),
                sum(v.memory_mib for v in vms),
                sum(v.vcpus for v in vms),
                cost_of(vms),
            )
        return info

    def _best_balancing_move(
        self,
        by_cpu: list[tuple[float, str]],
        by_mem: list[tuple[float, str]],
        weights: dict[str, list[tuple[float, str]]],
    ) -> tuple[float, list[str], str, str, float, float] | None:
        st = self.state
        n_src, n_dst, neighbours = self._widths()
        scan = SCAN * neighbours
        sources = {h for _, h in by_cpu[-n_src:]} | {h for _, h in by_mem[-n_src:]}
        targets = {h for _, h in by_cpu[:n_dst]} | {h for _, h in by_mem[:n_dst]}
        # The change of the objective is computed inline (as ClusterState.move_delta does,
        # both hosts being balanced ones): this loop is where the planner spends its time.
        # Per dimension, with a and b the unit's load on the source and target and o the
        # hosts' loads: d1 = b - a, d2 = a(a - 2 o_src) + b(b + 2 o_dst), and the objective
        # changes by d2 - d1 (2 s1 / n + d1 / n).
        n = len(st.balanced)
        inv_n = 1.0 / n
        kc, km = 2 * st.s1c * inv_n, 2 * st.s1m * inv_n
        ka, kv = 2 * st.s1a * inv_n, 2 * st.s1v * inv_n
        w, aw = st.mem_weight, st.alloc_weight
        rules = self.book.by_vm
        groups = self.book.groups
        placement, origin = st.placement, self.origin
        infos = self._infos
        best: tuple[float, str, str, str, float, float] | None = None
        best_key: tuple[float, str, str] | None = None
        for src in sorted(sources):
            ws = weights[src]
            if not ws:
                continue
            s = st.hosts[src]
            ics, ims = 1.0 / s.spec.cpu_capacity, 1.0 / s.spec.memory_mib
            ocs, oms = s.cpu * ics, s.mem * ims
            tcs, tms = 2 * ocs, 2 * oms
            tas, tvs = 2 * s.allocated * ims, 2 * s.vcpus * ics
            for dst in sorted(targets - {src}):
                d = st.hosts[dst]
                icd, imd = 1.0 / d.spec.cpu_capacity, 1.0 / d.spec.memory_mib
                ocd, omd = d.cpu * icd, d.mem * imd
                tcd, tmd = 2 * ocd, 2 * omd
                tad, tvd = 2 * d.allocated * imd, 2 * d.vcpus * icd
                room = d.spec.memory_mib - d.allocated
                # Ideal weight to move: half the gap in combined normalised load.
                ideal = ((ocs + oms) - (ocd + omd)) / 2
                if ideal <= 0:
                    continue
                i = bisect.bisect_left(ws, (ideal, ""))
                # The NEIGHBOURS movable units nearest the ideal on either side: units that
                # do not fit or that rules keep here are passed over (VMs held by an
                # affinity rule would otherwise hide every movable one from the search).
                for j0, j1, step in (
                    (i, min(len(ws), i + scan), 1),
                    (i - 1, max(-1, i - 1 - scan), -1),
                ):
                    taken = 0
                    for j in range(j0, j1, step):
                        if taken == neighbours:
                            break
                        key = ws[j][1]
                        info = infos.get(key)
                        cpu, mem, mib, vcpus, cost = info if info is not None else self._info(key)
                        if mib > room:
                            continue
                        if (key in rules or key in groups) and not self._rules_allow(key, dst):
                            continue
                        taken += 1
                        if placement[key] != origin[key]:
                            # Already moving in this plan: sending it elsewhere adds no migration
                            # (A->B->C is carried out as A->C), sending it home saves one.
                            cost = -cost if dst == origin[key] else 0.0
                        a, b = cpu * ics, cpu * icd
                        d1 = b - a
                        delta = a * (a - tcs) + b * (b + tcd) - d1 * (kc + d1 * inv_n)
                        a, b = mem * ims, mem * imd
                        d1 = b - a
                        delta += w * (a * (a - tms) + b * (b + tmd) - d1 * (km + d1 * inv_n))
                        if aw:
                            if delta > DEMAND_SLACK:
                                continue
                            a, b = mib * ims, mib * imd
                            d1 = b - a
                            alloc = a * (a - tas) + b * (b + tad) - d1 * (ka + d1 * inv_n)
                            a, b = vcpus * ics, vcpus * icd
                            d1 = b - a
                            alloc += a * (a - tvs) + b * (b + tvd) - d1 * (kv + d1 * inv_n)
                            delta += aw * alloc
                        net = -delta - cost
                        if net <= 0:
                            continue
                        cand = (-net, key, dst)
                        if best_key is None or cand < best_key:
                            best_key, best = cand, (net, key, src, dst, -delta, cost)
        if best is None:
            return None
        net, key, src, dst, gain, cost = best
        return net, self.book.unit(key), src, dst, gain, cost

    def account(self) -> None:
        """The plan's promise, whatever the passes did: every must rule holds, or the VMs
        that break it are listed unplaced with the rule named; a VM that moves is not listed
        unplaced (a later pass found it a place)."""
        moved = {v for v, h in self.state.placement.items() if h != self.origin[v]}
        self.unplaced = [u for u in self.unplaced if u["vm"] not in moved]
        listed = {u["vm"]: u for u in self.unplaced}
        must = [r for r in self.snap.rules if r.strength == "must"]
        for rule, bad in self.book.violations(self.state, must):
            stay = [v for v in bad if v not in moved] or [v for v in rule.vms if v not in moved]
            for vm in stay:
                entry = listed.get(vm)
                if entry is None:
                    why = f"must rule {rule.name} is broken; no move repairs it"
                    listed[vm] = entry = {"vm": vm, "reason": why}
                    self.unplaced.append(entry)
                elif f"rule {rule.name} " not in entry["reason"]:
                    entry["reason"] += f"; must rule {rule.name} stays broken"

    # ------------------------------------------------------------------ result

    def result(self, now: datetime, before: float) -> Plan:
        moves = collapse(self.steps)
        moves = waves(moves, {h.name: h.max_migrations for h in self.snap.hosts})
        auto = self.policy.automation == Automation.FULL
        moves = [
            Move(
                m.vm,
                m.source,
                m.target,
                m.priority,
                m.gain,
                m.cost,
                m.reason,
                m.wave,
                auto and m.priority <= self.policy.threshold,
            )
            for m in moves
        ]
        return Plan(
            moves=moves,
            imbalance_before=before,
            imbalance_after=self.state.imbalance(),
            threshold=self.policy.threshold,
            automation=self.policy.automation,
            planned_at=now,
            broken_should=self.broken,
            unplaced=self.unplaced,
            placement=dict(self.state.placement),
        )


def plan(snap: Snapshot, policy: Policy, now: datetime) -> Plan:
    """The moves that bring the cluster to its rules and into balance. Pure."""
    p = _Planner(snap, policy)
    before = p.state.imbalance()
    p.mandatory()
    p.balance()
    for _ in range(3):
        if not p.polish():
            break
        p.balance()
    # Balancing may have made room for a mandatory move or a rule fix that had none: retry
    # until nothing changes, so the plan is a fixed point and planning again finds nothing.
    for _ in range(3):
        steps = len(p.steps)
        p.unplaced = []
        p.mandatory()
        if len(p.steps) == steps:
            break
        p.balance()
    p.account()
    return p.result(now, before)
