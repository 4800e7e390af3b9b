"""The DRS planner: mandatory moves, then cost-aware load balancing, ordered into waves.

Pipeline (as Nomad's scheduler: reconcile, feasibility, score, plan):
  1. validate the snapshot (refuse contradictory must rules, unknown hosts, bad capacities);
  2. mandatory moves, priority 1: VMs on failed, quarantined or maintenance hosts, VMs breaking
     a must rule; priority 2: VMs on degraded hosts and VMs breaking a should rule. Each goes to
     the feasible host that leaves the cluster most balanced, so an evacuated host's VMs spread;
  3. balancing, priorities 2-5: repeatedly the single move with the best gain in balance net of
     its migration cost (the migration's predicted course over the link, cost.py; a move the
     guest would notice is left and reported), among the most and least loaded hosts
     (passing over VMs that rules hold or that do not fit), until no move reaches the
     threshold's priority or Policy.max_moves is spent. Because the stop rule depends only on
     the state, planning again on an uncapped result yields no move (with links differing per
     host pair, once the VMs it moved are held, as DRS's cool-down holds them);
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
from dataclasses import replace
from datetime import datetime
from typing import Any

from qmotion.api.drs import Automation
from qmotion.drs.cost import Forecast, Prices, forecast
from qmotion.drs.model import Health, Policy, Snapshot
from qmotion.drs.moves import Move, Plan, collapse, priority_of, waves
from qmotion.drs.polish import polish
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
        self._infos: dict[str, tuple[float, float, int, int]] = {}
        self.origin = {v.name: v.host for v in snap.vms}
        self.prices = Prices(snap, self.book.unit)
        # Units balancing would have moved but left, each with why (not gentle); the best
        # such candidate of the search step under way: (net gain, unit leader, why).
        self.left: dict[str, str] = {}
        self._noticed: tuple[float, str, str] | None = None
        # VMs a mandatory move took: Policy.max_moves never holds those back.
        self.required: set[str] = set()
        # Whether the rules let a unit (by its leader) go to a host, as balancing asks it
        # again and again; dropped for a unit when it or a VM sharing a rule with it moves.
        self._allowed: dict[str, dict[str, bool]] = {}

    # ------------------------------------------------------------------ helpers

    def _unit_demand(self, unit: list[str]) -> tuple[float, float, int, int]:
        """(CPU demand, memory demand, memory MiB, vCPUs) of the unit."""
        return self._info(unit[0])

    def forecast(self, key: str, dst: str) -> Forecast:
        return self.prices.forecast(key, dst)

    def _move_cost(self, key: str, dst: str) -> float:
        return self.prices.move_cost(key, dst, self.state.placement[key])

    def _delta(self, unit: list[str], host: str) -> float:
        """Change of the objective if ``unit`` moved to ``host``: a must-affinity group whose
        members are split is scored where each member is, not where the first one is."""
        placement = self.state.placement
        src = placement[unit[0]]
        if len(unit) == 1 or all(placement[v] == src for v in unit):
            cpu, mem, mib, vcpus = self._unit_demand(unit)
            return self.state.move_delta(cpu, mem, mib, vcpus, src, host)
        before = self.state.objective()
        back = {v: placement[v] for v in unit if placement[v] != host}
        for vm in back:
            self.state.move(vm, host)
        after = self.state.objective()
        for vm, h in back.items():
            self.state.move(vm, h)
        return after - before

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

    def _best_target(
        self, unit: list[str], strengths: tuple[str, ...], why: list[str] | None = None
    ) -> tuple[str, float] | None:
        """The host where the unit's move leaves the cluster most balanced net of its cost
        (among equal gains the move that ends soonest), of those that pass every test and
        where its migration converges; ``why`` collects the moves left for not converging."""
        # Only the hosts the unit's rules leave (on a large cluster an affinity rule leaves
        # one of a thousand), best first; then the first that passes every test.
        allowed = self.book.hosts_for(self.state, unit, strengths)
        hosts = self.state.hosts
        key = unit[0]
        ranked = sorted(
            (self._delta(unit, name) + self._move_cost(key, name), name)
            for name in (hosts if allowed is None else allowed & hosts.keys())
            if hosts[name].spec.usable
        )
        for score, host in ranked:
            if self._feasible(unit, host, strengths):
                fc = self.forecast(key, host)
                if not fc.converges:
                    if why is not None:
                        why.append(f"to {host}: {fc.why}")
                    continue
                return host, score - self._move_cost(key, host)
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
            mine = [r for r in self.snap.rules if any(v in r.vms for v in first)]
            broken_now = bool(mine) and any(
                set(bad) & set(first) for _, bad in self.book.violations(self.state, mine)
            )
            if any(self.state.placement[v] != self.origin[v] for v in first) and not broken_now:
                # Moved already (as another unit's alternative, or by an earlier pass); one
                # placed where it breaks a should rule (nothing else fitted then) is placed
                # again: balancing may have made room since.
                continue
            if alts and not self.book.violations(self.state, mine):
                continue  # a partner's move repaired it
            # An anti-affinity repair moves whichever of the VMs together costs least and
            # may move (a pinned one cannot): the unit's own move or a partner's.
            why: list[str] = []
            options = []
            for cand in [first, *alts]:
                # (a partner the plan moved already may move again: A->B->C is A->C)
                got = self._best_target(cand, ("must", "should"), why)
                if got is not None:
                    score = got[1] + self._move_cost(cand[0], got[0])
                    options.append((score, cand[0], cand, got))
            unit, found = first, None
            if options:
                _, _, unit, found = min(options)
            note = reason
            if found is None and prio == 1:
                found = self._best_target(unit, ("must",), why)
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
                detail = "; ".join(dict.fromkeys(why)) or "no feasible host"
                for vm in unit:
                    self.unplaced.append({"vm": vm, "reason": f"{reason}; {detail}"})
                continue
            host, delta = found
            self.required.update(unit)
            self._apply(unit, host, prio, -delta, self._move_cost(unit[0], host), note)

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
            self._noticed = None
            best = self._best_balancing_move(by_cpu, by_mem, weights)
            noticed = self._noticed
            # A move the guest would notice that would have been this step's (it beats the
            # best gentle one, reaches the threshold, fits the budget) is reported as left.
            if (
                noticed is not None
                and (best is None or noticed[0] > best[0])
                and priority_of(noticed[0]) <= self.policy.threshold
                and budget > 0
            ):
                self.left.setdefault(noticed[1], noticed[2])
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
        """Exchange destinations of moved VMs where that balances better (polish.py)."""
        if self.policy.threshold < 2:
            return False
        held = self.book.by_vm.keys() | self.book.groups.keys()
        return polish(self.state, self.origin, held, self._info, self.prices, self.steps)

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

    def _info(self, key: str) -> tuple[float, float, int, int]:
        """(CPU demand, memory demand, memory MiB, vCPUs) of the unit led by ``key``."""
        info = self._infos.get(key)
        if info is None:
            vms = [self.state.vms[v] for v in self.book.unit(key)]
            info = self._infos[key] = (
                sum(v.cpu for v in vms),
                sum(v.mem_demand for v in vms),
                sum(v.memory_mib for v in vms),
                sum(v.vcpus for v in vms),
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
        infos, anywhere = self._infos, self.prices.anywhere
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
                        cpu, mem, mib, vcpus = info if info is not None else self._info(key)
                        if mib > room:
                            continue
                        if (key in rules or key in groups) and not self._rules_allow(key, dst):
                            continue
                        if placement[key] == origin[key] and key not in groups:
                            fc = (
                                anywhere.get(key) if anywhere is not None else None
                            ) or self.forecast(key, dst)
                            cost = fc.cost
                        else:
                            # Already moving in this plan: A->B->C is carried out as A->C
                            # and costs what A->C costs more (sending it home saves the
                            # move). A group's members may come from different hosts: each
                            # one not home on dst must move gently.
                            fc = self.forecast(key, dst)
                            cost = self._move_cost(key, dst)
                        # A move the guest would notice (throttled) or that would not end
                        # is not made; it is reported if it would have been one.
                        noticed = fc.why
                        if noticed is None:
                            taken += 1
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
                        if noticed is not None:
                            if self._noticed is None or net > self._noticed[0]:
                                self._noticed = (net, key, noticed)
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
        # Should rules reported broken by a move stay reported only if the final placement
        # breaks them (a later pass may have found the VM a better host).
        placement = self.state.placement
        still = set()
        for rule, bad in self.book.violations(
            self.state, [r for r in self.snap.rules if r.strength == "should"]
        ):
            # The VMs breaking it: those listed, and (apart) those sharing their hosts.
            hosts = {placement[v] for v in bad}
            for vm in rule.vms:
                if (
                    vm in bad
                    or rule.kind == "affinity"  # apart from the others, whichever moved
                    or (rule.kind == "anti_affinity" and placement[vm] in hosts)
                ):
                    still.add((rule.name, vm))
        self.broken = [
            b
            for b in self.broken
            if any((b["rule"], vm) in still for vm in b["vms"])
            and all(self.state.placement[vm] == b["host"] for vm in b["vms"])
        ]
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
        st = self.state
        seconds = {
            (vm, h): forecast(st.vms[vm], *self.prices.link(self.origin[vm], h)).seconds
            for vm, h in st.placement.items()
            if h != self.origin[vm]
        }
        moves = collapse(self.steps, seconds)
        # A should rule a move broke, that a later pass mended, is not the move's reason.
        still = {vm for b in self.broken for vm in b["vms"]}
        moves = [
            replace(m, reason=m.reason.split("; breaks should rule(s) ")[0])
            if m.vm not in still
            else m
            for m in moves
        ]
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
                m.seconds,
            )
            for m in moves
        ]
        left = [
            {"vm": vm, "reason": why}
            for key, why in sorted(self.left.items())
            for vm in self.book.unit(key)
            if st.placement[vm] == self.origin[vm]
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
            left=left,
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
