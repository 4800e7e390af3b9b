"""DRS on the live cluster: rules, settings, measured demand, recommendations, placement.

The planner (``qmotion.drs``) is pure; this module feeds it the live inventory (hosts, VMs,
rules, measured demand, migrations under way, DRS's cool-down) and acts on its answer through
the task runner, so a DRS move gets the same pre-checks as an operator's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from pydantic import ValidationError
from sqlalchemy import select, update

from qmotion.api.drs import (
    ApplyRequest,
    Automation,
    DrsRunOut,
    DrsSettings,
    DrsState,
    MoveOutcome,
    OperationReport,
    Placement,
    PlacementCandidate,
    RecommendationOut,
    RecommendationState,
    RuleCreate,
    RuleOut,
    SettingsSet,
)
from qmotion.api.host import HostMetrics
from qmotion.api.server import TaskOut, VmCreate, VmOut
from qmotion.api.sizes import parse_duration_s
from qmotion.drs.errors import SnapshotError
from qmotion.drs.inventory import snapshot_from_inventory
from qmotion.drs.model import (
    ALLOCATION_WEIGHT,
    Health,
    HostSpec,
    Policy,
    Rule,
    Snapshot,
    VmSpec,
)
from qmotion.drs.planner import place, plan
from qmotion.drs.rules import RuleBook, broken_by_move, validate
from qmotion.drs.state import ClusterState
from qmotion.server.automation.operations import Operations, PlannedMove
from qmotion.server.db import (
    ACTIVE_TASK_STATES,
    Database,
    Host,
    PlacementRule,
    Recommendation,
    Task,
    Vm,
    utcnow,
)
from qmotion.server.errors import Conflict, Invalid, NotFound
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.task_view import DRS_APPLY, MAINTENANCE

log = logging.getLogger(__name__)
SETTINGS_KEY = "drs"
WINDOW_S = 300.0  # measured demand: the mean over this sliding window
# ``cluster set`` keys: the DrsSettings field and how its value is written.
SETTING_KEYS = {
    "drs.automation": "automation",
    "drs.threshold": "threshold",
    "drs.interval": "interval_s",
    "drs.max-moves": "max_moves",
    "drs.cooldown": "cooldown_s",
    "drs.proactive": "proactive",
    "host.down-grace": "down_grace_s",
}
DURATIONS = {"interval_s", "cooldown_s", "down_grace_s"}


def model_rule(r: PlacementRule) -> Rule:
    return Rule(
        name=r.name,
        kind=r.kind.replace("-", "_"),
        strength=r.strength,
        vms=list(r.vms),
        hosts=list(r.hosts),
    )


class DemandWindow:
    """Per-VM CPU (cores) and memory (MiB) samples from the agents, over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window = timedelta(seconds=window_s)
        self.samples: dict[str, deque[tuple[datetime, float, float]]] = {}
        # The agents measure dirty rates now and then: the latest one per VM.
        self.dirty: dict[str, tuple[datetime, float]] = {}
        # Refresh threads add while planning threads read.
        self._lock = threading.Lock()

    def add(self, metrics: HostMetrics) -> None:
        with self._lock:
            for v in metrics.vms:
                q = self.samples.setdefault(v.name, deque())
                q.append((metrics.sampled_at, v.cpu_percent / 100.0, v.rss_bytes / (1 << 20)))
                if v.dirty_rate_mib_s is not None:
                    self.dirty[v.name] = (metrics.sampled_at, v.dirty_rate_mib_s)
            self._prune(metrics.sampled_at)

    def _prune(self, now: datetime) -> None:
        for vm, q in list(self.samples.items()):
            while q and now - q[0][0] > self.window:
                q.popleft()
            if not q:
                del self.samples[vm]
        for vm, (at, _) in list(self.dirty.items()):
            if now - at > self.window:
                del self.dirty[vm]

    def dirty_rates(self, now: datetime) -> dict[str, float]:
        with self._lock:
            self._prune(now)
            return {vm: rate for vm, (_, rate) in self.dirty.items()}

    def demand(self, now: datetime) -> dict[str, tuple[float, float]]:
        with self._lock:
            self._prune(now)
            return {
                vm: (sum(x[1] for x in q) / len(q), sum(x[2] for x in q) / len(q))
                for vm, q in self.samples.items()
            }


class ClusterDrs:
    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        operations: Operations,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db, self.inventory, self.ops, self.clock = db, inventory, operations, clock
        self.window = DemandWindow()
        self._run_lock = threading.Lock()  # one plan stored at a time (run ids, supersede)

    # ------------------------------------------------------------------ settings

    def settings(self) -> DrsSettings:
        return DrsSettings.model_validate(self.db.setting(SETTINGS_KEY) or {})

    def set_settings(self, req: SettingsSet) -> DrsSettings:
        values = self.settings().model_dump()
        for key, text in req.values.items():
            name = SETTING_KEYS.get(key)
            if name is None:
                raise Invalid(
                    f"unknown setting {key!r} (settings: {', '.join(SETTING_KEYS)})", field=key
                )
            try:
                values[name] = parse_duration_s(text) if name in DURATIONS else text
            except ValueError as exc:
                raise Invalid(f"{key}: {exc}", field=key) from exc
        try:
            out = DrsSettings.model_validate(values)
        except ValidationError as exc:
            e = exc.errors()[0]
            key = next(k for k, v in SETTING_KEYS.items() if v == e["loc"][0])
            raise Invalid(f"{key}: {e['msg']}", field=key) from exc
        self.db.set_setting(SETTINGS_KEY, out.model_dump(mode="json"))
        return out

    # ------------------------------------------------------------------ rules

    def _rule_out(self, r: PlacementRule, placement: dict[str, str]) -> RuleOut:
        missing = [v for v in r.vms if v not in placement]
        model = model_rule(r)
        broken = sorted(
            {
                vm
                for vm in r.vms
                if vm in placement and broken_by_move([model], placement, vm, placement[vm])
            }
        )
        return RuleOut(
            name=r.name,
            kind=r.kind,
            strength=r.strength,
            vms=list(r.vms),
            hosts=list(r.hosts),
            missing_vms=missing,
            broken_by=broken,
            created_at=r.created_at,
        )

    def _placement(self) -> dict[str, str]:
        with self.db.session() as s:
            return {v.name: v.host.name for v in s.scalars(select(Vm))}

    def list_rules(self) -> list[RuleOut]:
        placement = self._placement()
        with self.db.session() as s:
            rows = s.scalars(select(PlacementRule).order_by(PlacementRule.name))
            return [self._rule_out(r, placement) for r in rows]

    def get_rule(self, name: str) -> RuleOut:
        placement = self._placement()
        with self.db.session() as s:
            r = s.scalars(select(PlacementRule).where(PlacementRule.name == name)).first()
            if r is None:
                raise NotFound(f"no rule named {name!r}")
            return self._rule_out(r, placement)

    def delete_rule(self, name: str) -> None:
        with self.db.session() as s:
            r = s.scalars(select(PlacementRule).where(PlacementRule.name == name)).first()
            if r is None:
                raise NotFound(f"no rule named {name!r}")
            s.delete(r)

    def create_rule(self, req: RuleCreate) -> RuleOut:
        new = Rule(
            name=req.name,
            kind=req.kind.replace("-", "_"),
            strength=req.strength,
            vms=req.vms,
            hosts=req.hosts,
        )
        with self.db.session() as s:
            if s.scalars(select(PlacementRule).where(PlacementRule.name == req.name)).first():
                raise Conflict(f"a rule named {req.name!r} exists", field="name")
            hosts = [h.name for h in s.scalars(select(Host))]
            unknown = [h for h in req.hosts if h not in hosts]
            if unknown:
                raise Invalid(
                    f"no host named {', '.join(unknown)} (hosts: {', '.join(sorted(hosts))})",
                    field="hosts",
                )
            existing = [model_rule(r) for r in s.scalars(select(PlacementRule))]
            vms = {v.name for v in s.scalars(select(Vm))}
            # Contradictions are a property of the rules, whichever VMs exist: check them on
            # every VM any rule names.
            named = sorted(vms | {v for r in [*existing, new] for v in r.vms})
            probe = Snapshot(
                hosts=[HostSpec(name=h, cpu_capacity=1, memory_mib=1) for h in hosts],
                vms=[VmSpec(name=v, host=hosts[0], memory_mib=1) for v in named] if hosts else [],
                rules=[*existing, new],
            )
            if hosts:
                try:
                    validate(probe)
                except SnapshotError as exc:
                    raise Conflict(f"{exc}", code="rule_contradiction", field="name") from exc
            row = PlacementRule(
                name=req.name, kind=req.kind, strength=req.strength, vms=req.vms, hosts=req.hosts
            )
            s.add(row)
            s.flush()
            placement = {v.name: v.host.name for v in s.scalars(select(Vm))}
            return self._rule_out(row, placement)

    def rules(self) -> list[Rule]:
        with self.db.session() as s:
            return [model_rule(r) for r in s.scalars(select(PlacementRule))]

    def check_move(
        self,
        vm: str,
        to: str,
        *,
        new: bool = False,
        also: Mapping[str, str] | None = None,
        rules: list[Rule] | None = None,
    ) -> None:
        """Refuse (409, naming the rule) a VM on ``to`` that a must rule forbids; ``also``:
        other VMs' hosts once moves made with this one are done."""
        placement = {**self._placement(), **(also or {})}
        if new:
            placement.pop(vm, None)
        elif placement.get(vm) == to:
            return  # not a move (a storage move on its host)
        rules = self.rules() if rules is None else rules
        # A VM migrating now is at its source and soon at its destination: both count.
        broken = broken_by_move(rules, placement, vm, to)
        landing = {k: v for k, v in {**placement, **self._inflight()}.items() if k != vm}
        broken += [r for r in broken_by_move(rules, landing, vm, to) if r not in broken]
        if broken:
            names = ", ".join(r.name for r in broken)
            raise Conflict(
                f"{vm} on {to} would break must rule {names} (--force to do it anyway)",
                code="rule_violation",
                vm=vm,
                host=to,
                field="to",
            )

    def _inflight(self) -> dict[str, str]:
        with self.db.session() as s:
            active = select(Task).where(
                Task.state.in_(ACTIVE_TASK_STATES), Task.destination.is_not(None)
            )
            return {t.vm: t.destination for t in s.scalars(active) if t.vm and t.destination}

    def recheck(
        self,
        move: PlannedMove,
        planned: Sequence[PlannedMove] = (),
        submitted: Sequence[PlannedMove] = (),
    ) -> str | None:
        """A planned move against the live inventory, just before it starts. Moves already
        submitted count as made; so do the planned moves of its must-affinity partners (each
        member is checked against the others' new host; a partner whose move was skipped or
        failed is no longer planned, so the rest of its group stays too)."""
        vm, source, target = move.vm, move.source, move.target
        rules = self.rules()
        partners = {
            o
            for r in rules
            if r.kind == "affinity" and r.strength == "must" and vm in r.vms
            for o in r.vms
        }
        also = {m.vm: m.target for m in planned if m.vm in partners and m.vm != vm}
        also |= {m.vm: m.target for m in submitted}
        with self.db.session() as s:
            row = s.scalars(select(Vm).where(Vm.name == vm)).first()
            if row is None:
                return "the VM no longer exists"
            if row.host.name != source:
                return f"it is on {row.host.name} now, not {source}"
            dst = s.scalars(select(Host).where(Host.name == target)).first()
            if dst is None or dst.state != "up":
                return f"host {target} is {dst.state if dst else 'gone'}"
            facts = dst.facts or {}
            if facts.get("health") == "degraded" and self.settings().proactive:
                return f"host {target} is degraded: {'; '.join(facts.get('health_reasons', []))}"
        try:
            self.check_move(vm, target, also=also, rules=rules)
        except Conflict as exc:
            return exc.message
        return None

    # ------------------------------------------------------------------ snapshot

    def sample(self, metrics: HostMetrics) -> None:
        self.window.add(metrics)

    def snapshot(self, cooldown: bool = False, now: datetime | None = None) -> Snapshot:
        """The live cluster as DRS plans on it; ``cooldown`` pins VMs DRS moved lately."""
        now = now or self.clock()
        pinned: dict[str, str] = {}
        st = self.settings()
        if cooldown and st.cooldown_s > 0:
            since = now - timedelta(seconds=st.cooldown_s)
            with self.db.session() as s:
                rows = s.scalars(
                    select(Recommendation)
                    .where(
                        Recommendation.state == RecommendationState.APPLIED,
                        Recommendation.applied_at >= since,
                    )
                    .order_by(Recommendation.applied_at)
                )
                pinned = {r.vm: r.target for r in rows}  # the latest move of each VM wins
        hosts, vms = self.inventory.list_hosts(), self.inventory.list_vms()
        where = {v.name: v.host for v in vms}
        pinned = {vm: h for vm, h in pinned.items() if where.get(vm) == h}
        rules, demand = self.rules(), self.window.demand(now)
        dirty = self.window.dirty_rates(now)
        proactive = st.proactive
        snap = snapshot_from_inventory(hosts, vms, rules, demand, pinned, dirty, proactive)
        try:
            validate(snap)
            return snap
        except SnapshotError:
            pass
        # Cool-down pins of a group an operator split: the rules come first.
        snap = snapshot_from_inventory(hosts, vms, rules, demand, dirty=dirty, proactive=proactive)
        try:
            validate(snap)
            return snap
        except SnapshotError:
            pass
        # VMs migrating right now, held where they are, can leave a rule unsatisfiable for
        # the moment (two anti-affine VMs leaving one host): plan without them in the rules.
        moving = {v.name for v in vms if v.migrating}
        return snapshot_from_inventory(
            hosts,
            vms,
            [r.model_copy(update={"vms": [v for v in r.vms if v not in moving]}) for r in rules],
            demand,
            dirty=dirty,
            proactive=proactive,
        )

    # ------------------------------------------------------------------ placement

    def placement(self, spec: VmSpec) -> list[PlacementCandidate]:
        snap = self.snapshot()
        try:
            ranked = place(snap, spec, self._policy(snap))
        except SnapshotError as exc:
            raise Conflict(f"cannot place: {exc}", code="invalid_cluster") from exc
        # The snapshot's rules name existing VMs only; rules naming the new one count here.
        rules, where = self.rules(), {v.name: v.host for v in snap.vms}
        out = []
        for c in ranked:
            feasible, reasons = c.feasible, list(c.reasons)
            for r in broken_by_move(rules, where, spec.name, c.host, ("must", "should")):
                feasible = feasible and r.strength != "must"
                reasons.append(f"{r.strength} rule {r.name} forbids it")
            out.append(
                PlacementCandidate(host=c.host, feasible=feasible, score=c.score, reasons=reasons)
            )
        out.sort(key=lambda c: (not c.feasible, c.score, c.host))
        return out

    def create_vm(self, req: VmCreate, force: bool = False) -> VmOut:
        """``vm create``: DRS picks the host when none is given; a given host is checked
        against the must rules (unless ``force``)."""
        spec = VmSpec(name=req.name, host="-", memory_mib=req.memory, vcpus=req.vcpus)
        if req.host is None:
            candidates = self.placement(spec)
            ok = [c for c in candidates if c.feasible]
            if not ok:
                why = "; ".join(f"{c.host}: {', '.join(c.reasons)}" for c in candidates)
                raise Conflict(
                    f"no host can take {req.name}: {why or 'no hosts'}",
                    code="no_host",
                    vm=req.name,
                    field="host",
                )
            if self.settings().automation == Automation.MANUAL:
                raise Conflict(
                    f"DRS automation is manual: give the host (recommended: {ok[0].host}; "
                    + "; ".join(f"{c.host} score {c.score:.4f}" for c in ok)
                    + ")",
                    code="placement_manual",
                    vm=req.name,
                    field="host",
                )
            chosen = Placement(host=ok[0].host, chosen_by="drs", candidates=candidates)
        else:
            if not force:
                self.check_move(req.name, req.host, new=True)
            chosen = Placement(host=req.host, chosen_by="operator", candidates=[])
        out = self.inventory.create_vm(req.model_copy(update={"host": chosen.host}))
        return out.model_copy(update={"placement": chosen})

    # ------------------------------------------------------------------ recommendations

    def _policy(self, snap: Snapshot) -> Policy:
        st = self.settings()
        # The even-allocation term counts vCPUs per CPU: on overcommitted hosts (a lab host
        # offering one CPU to several VMs) it would outweigh the measured demand it is meant
        # to come second to. Scaled by the commitment, it weighs the same at any ratio.
        cpus = sum(h.cpu_capacity for h in snap.hosts if h.usable) or 1.0
        ratio = max(1.0, sum(v.vcpus for v in snap.vms) / cpus)
        return Policy(
            threshold=st.threshold,
            automation=st.automation,
            max_moves=st.max_moves,
            allocation_weight=ALLOCATION_WEIGHT / ratio**2,
        )

    def run(self) -> DrsRunOut:
        """Plan on the live inventory and store the moves as the pending recommendations
        (earlier pending ones are superseded)."""
        with self._run_lock:
            return self._run()

    def _run(self) -> DrsRunOut:
        now = self.clock()
        snap = self.snapshot(cooldown=True, now=now)
        try:
            result = plan(snap, self._policy(snap), now)
        except SnapshotError as exc:
            raise Conflict(f"cannot plan: {exc}", code="invalid_cluster") from exc
        # A host entering maintenance is evacuated by its maintenance task, not by DRS; a
        # down host's VMs cannot be migrated live (their agent does not answer).
        evacuating = {h.name for h in snap.hosts if h.maintenance}
        down = {h.name for h in snap.hosts if h.health == Health.FAILED}
        # (a degraded host's VMs, with drs.proactive, are moves like any other: priority 2)
        moves = [
            m
            for m in result.moves
            if m.priority <= result.threshold and m.source not in evacuating | down
        ]
        unplaced = list(result.unplaced) + [
            {"vm": m.vm, "reason": f"its host {m.source} is down"}
            for m in result.moves
            if m.source in down
        ]
        with self.db.session() as s:
            pending = {
                (r.vm, r.source, r.target): r
                for r in s.scalars(
                    select(Recommendation).where(
                        Recommendation.state == RecommendationState.PENDING
                    )
                )
            }
            last = s.scalars(select(Recommendation.run_id).order_by(Recommendation.run_id.desc()))
            run_id = (last.first() or 0) + 1
            rows = []
            for m in moves:
                same = pending.pop((m.vm, m.source, m.target), None)
                if same is not None:
                    # The same move again: it keeps its id, so `drs apply ID` still finds it.
                    same.run_id, same.wave, same.priority = run_id, m.wave, m.priority
                    rows.append(same)
                    continue
                r = Recommendation(
                    run_id=run_id,
                    vm=m.vm,
                    source=m.source,
                    target=m.target,
                    priority=m.priority,
                    reason=m.reason,
                    gain=m.gain - m.cost,
                    wave=m.wave,
                    state=RecommendationState.PENDING,
                )
                s.add(r)
                rows.append(r)
            for stale in pending.values():
                stale.state = RecommendationState.SUPERSEDED
            s.flush()
            recs = [self._rec_out(r) for r in rows]
        measured = len(self.window.demand(now))
        return DrsRunOut(
            run_id=run_id,
            planned_at=now,
            automation=result.automation,
            threshold=result.threshold,
            imbalance_before=result.imbalance_before,
            imbalance_after=result.imbalance_after,
            recommendations=recs,
            unplaced=unplaced,
            broken_should_rules=result.broken_should,
            measured_vms=measured,
        )

    @staticmethod
    def _rec_out(r: Recommendation) -> RecommendationOut:
        return RecommendationOut.model_validate(r, from_attributes=True)

    def recommendations(self, all_states: bool = False) -> list[RecommendationOut]:
        with self.db.session() as s:
            q = select(Recommendation).order_by(Recommendation.id.desc()).limit(200)
            if not all_states:
                q = q.where(Recommendation.state == RecommendationState.PENDING)
            return [self._rec_out(r) for r in s.scalars(q)]

    def apply(self, req: ApplyRequest) -> TaskOut:
        """Run pending recommendations as migrations, wave by wave, each re-checked first."""
        with self.db.session() as s:
            q = select(Recommendation).where(Recommendation.state == RecommendationState.PENDING)
            if not req.all:
                q = q.where(Recommendation.id.in_(req.ids))
            rows = list(s.scalars(q.order_by(Recommendation.wave, Recommendation.id)))
            if not req.all:
                found = {r.id for r in rows}
                missing = [i for i in req.ids if i not in found]
                if missing:
                    raise Conflict(
                        f"recommendations {', '.join(map(str, missing))} are not pending "
                        "(applied, superseded by a later run, or unknown)",
                        field="ids",
                    )
            if not rows:
                raise Conflict("no pending recommendations: run `drs run` first", field="all")
            # Claimed only if still pending: a run or another apply may have got there first.
            claimed = s.execute(
                update(Recommendation)
                .where(
                    Recommendation.id.in_([r.id for r in rows]),
                    Recommendation.state == RecommendationState.PENDING,
                )
                .values(state=RecommendationState.APPLYING)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != len(rows):  # type: ignore[attr-defined]
                raise Conflict("the recommendations changed meanwhile: try again", field="ids")
            moves = [PlannedMove(r.vm, r.source, r.target, r.wave, r.reason) for r in rows]
            ids = {r.vm: r.id for r in rows}
        return self._apply_moves(moves, ids)

    def _apply_moves(self, moves: Sequence[PlannedMove], ids: dict[str, int]) -> TaskOut:
        def record(o: MoveOutcome) -> None:
            state = {
                "moved": RecommendationState.APPLIED,
                "failed": RecommendationState.FAILED,
            }.get(o.outcome, RecommendationState.SKIPPED)
            with self.db.session() as s:
                r = s.get(Recommendation, ids[o.vm])
                if r is not None:
                    r.state, r.task_id, r.message = state, o.task_id, o.reason
                    r.applied_at = self.clock() if state == RecommendationState.APPLIED else None

        async def body(task_id: int, cancel: asyncio.Event) -> tuple[OperationReport, str | None]:
            outcomes = await self.ops.run_waves(task_id, moves, cancel, self.recheck, record)
            done = {o.vm for o in outcomes}
            for m in moves:
                if m.vm not in done:  # cancelled before its wave
                    record(
                        MoveOutcome(
                            vm=m.vm,
                            source=m.source,
                            target=m.target,
                            outcome="skipped",
                            reason="the operation was cancelled",
                        )
                    )
            report = OperationReport(kind=DRS_APPLY, moves=outcomes, spread=_spread(outcomes))
            failed = [o for o in outcomes if o.outcome == "failed"]
            error = "; ".join(f"{o.vm}: {o.reason}" for o in failed) if failed else None
            return report, error

        return self.ops.start(DRS_APPLY, None, f"DRS: {len(moves)} moves", body)

    async def run_and_apply(self) -> TaskOut:
        """Plan and apply every move at once (a scheduled DRS run): always a task, which
        ends at once when there is nothing to move."""
        if await asyncio.to_thread(self._busy):
            raise Conflict("DRS moves are still being applied", code="drs_busy")
        out = await asyncio.to_thread(self.run)
        with self.db.session() as s:
            claimed = s.execute(
                update(Recommendation)
                .where(
                    Recommendation.id.in_([r.id for r in out.recommendations]),
                    Recommendation.state == RecommendationState.PENDING,
                )
                .values(state=RecommendationState.APPLYING)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != len(out.recommendations):  # type: ignore[attr-defined]
                raise Conflict("the recommendations changed meanwhile", code="drs_busy")
        moves = [
            PlannedMove(r.vm, r.source, r.target, r.wave, r.reason) for r in out.recommendations
        ]
        return self._apply_moves(moves, {r.vm: r.id for r in out.recommendations})

    # ------------------------------------------------------------------ automation

    async def tick(self) -> DrsRunOut:
        """One automation round: recommend (manual, partial), or also apply (full)."""
        st = self.settings()
        out = await asyncio.to_thread(self.run)
        if st.automation != Automation.FULL or not out.recommendations:
            return out
        if await asyncio.to_thread(self._busy):
            return out  # the last round's moves (or an evacuation) still run: next round
        req = ApplyRequest(ids=[r.id for r in out.recommendations])
        task = self.apply(req)  # on the loop: it starts the operation's task
        return out.model_copy(update={"applied_task": task.id})

    async def run_forever(self, poll_s: float = 5.0) -> None:
        last: datetime | None = None
        while True:
            await asyncio.sleep(poll_s)
            try:
                st = await asyncio.to_thread(self.settings)
                now = self.clock()
                if last is not None and (now - last).total_seconds() < st.interval_s:
                    continue
                if await asyncio.to_thread(self._busy):
                    continue  # the previous round's moves are still running
                last = now
                await self.tick()
            except Exception:  # the loop must outlive one bad round
                log.exception("DRS round failed")

    def _busy(self) -> bool:
        """A DRS apply or a maintenance evacuation is running."""
        with self.db.session() as s:
            active = select(Task).where(
                Task.kind.in_((DRS_APPLY, MAINTENANCE)), Task.state.in_(ACTIVE_TASK_STATES)
            )
            return s.scalars(active).first() is not None

    def recover_after_restart(self) -> None:
        """Recommendations a previous manager was applying: their apply task ended with it
        (the migrations it started went on by themselves)."""
        with self.db.session() as s:
            s.execute(
                update(Recommendation)
                .where(Recommendation.state == RecommendationState.APPLYING)
                .values(
                    state=RecommendationState.FAILED,
                    message="the manager restarted while applying; see the VM's tasks",
                )
            )

    def state(self) -> DrsState:
        """The live imbalance and how many VMs break a must rule."""
        now = self.clock()
        snap = self.snapshot(now=now)
        state = ClusterState(snap, self._policy(snap).allocation_weight)
        book = RuleBook.build(snap)
        broken = book.violations(state, [r for r in snap.rules if r.strength == "must"])
        return DrsState(
            imbalance=state.imbalance(),
            broken_must_rules=sum(len(b) for _, b in broken),
            measured_vms=len(self.window.demand(now)),
        )


def _spread(outcomes: Sequence[MoveOutcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        if o.outcome == "moved" and o.target:
            out[o.target] = out.get(o.target, 0) + 1
    return dict(sorted(out.items()))
