"""DRS on the live cluster: recommendations, placement, applying moves, the periodic round.

The planner (``qmotion.drs``) is pure; this module feeds it the live inventory (hosts, VMs,
rules, measured demand, migrations under way, DRS's cool-down) and acts on its answer through
the task runner, so a DRS move gets the same pre-checks as an operator's. The settings and
rules, and the checks of one move against them, are in drs_config.py; the measured demand in
demand.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update

from qmotion.api.drs import (
    ApplyRequest,
    Automation,
    DrsRunOut,
    DrsState,
    MoveOutcome,
    OperationReport,
    Placement,
    PlacementCandidate,
    RecommendationOut,
    RecommendationState,
)
from qmotion.api.host import HostMetrics
from qmotion.api.server import TaskOut, VmCreate, VmOut
from qmotion.drs.errors import SnapshotError
from qmotion.drs.inventory import snapshot_from_inventory
from qmotion.drs.model import ALLOCATION_WEIGHT, Health, Policy, Snapshot, VmSpec
from qmotion.drs.placement import place
from qmotion.drs.planner import plan
from qmotion.drs.rules import RuleBook, broken_by_move, validate
from qmotion.drs.state import ClusterState
from qmotion.server.automation import drs_history
from qmotion.server.automation.demand import DemandWindow
from qmotion.server.automation.drs_config import DrsConfig
from qmotion.server.automation.operations import Operations, PlannedMove, spread
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Recommendation, Task, Vm, utcnow
from qmotion.server.errors import Conflict
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.task_view import DRS_APPLY, MAINTENANCE

log = logging.getLogger(__name__)


class ClusterDrs:
    """DRS on the live cluster. ``config`` holds its settings and rules and checks one move
    against them (the manager's routes ask DRS itself for ``settings`` and ``check_move``);
    ``window`` the measured demand."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        operations: Operations,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db, self.inventory, self.ops, self.clock = db, inventory, operations, clock
        self.config = DrsConfig(db)
        self.window = DemandWindow()
        self._run_lock = threading.Lock()  # one plan stored at a time (run ids, supersede)

    # ------------------------------------------------------------------ snapshot

    def sample(self, metrics: HostMetrics) -> None:
        self.window.add(metrics)

    def snapshot(
        self,
        cooldown: bool = False,
        now: datetime | None = None,
        avoid: dict[str, set[str]] | None = None,
        links: bool = True,
        waiting: list[drs_history.Backoff] | None = None,
    ) -> Snapshot:
        """The live cluster as DRS plans on it, with the links measured between its hosts
        (``links``: for planning moves, not a new VM's placement); ``cooldown`` pins VMs DRS
        moved lately and holds failed moves back (back-off); ``avoid``: VM -> hosts it
        should not be planned onto unless nothing else fits (rules ``failed:VM``); ``waiting``:
        the back-offs, when the caller read them already."""
        now = now or self.clock()
        snap = self._snapshot(cooldown, now)
        if links:
            found, default = drs_history.links(self.db, [h.name for h in snap.hosts])
            snap = snap.model_copy(update={"links": found, "default_bandwidth_mib_s": default})
        held: dict[str, set[str]] = {}
        if cooldown:
            for b in drs_history.backoffs(self.db, now) if waiting is None else waiting:
                held.setdefault(b.vm, set()).add(b.target)
            snap = drs_history.hold(snap, held, "backoff")
        return drs_history.hold(snap, avoid or {}, "failed", strength="should")

    def _snapshot(self, cooldown: bool, now: datetime) -> Snapshot:
        pinned: dict[str, str] = {}
        st = self.config.settings()
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
        rules, demand = self.config.rules(), self.window.demand(now)
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
        moving = {v.name for v in vms if v.migrating or v.attention is not None}
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
        snap = self.snapshot(links=False)
        try:
            ranked = place(snap, spec, self._policy(snap))
        except SnapshotError as exc:
            raise Conflict(f"cannot place: {exc}", code="invalid_cluster") from exc
        # The snapshot's rules name existing VMs only; rules naming the new one count here.
        rules, where = self.config.rules(), {v.name: v.host for v in snap.vms}
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
            if self.config.settings().automation == Automation.MANUAL:
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
                self.config.check_move(req.name, req.host, new=True)
            chosen = Placement(host=req.host, chosen_by="operator", candidates=[])
        out = self.inventory.create_vm(req.model_copy(update={"host": chosen.host}))
        return out.model_copy(update={"placement": chosen})

    # ------------------------------------------------------------------ recommendations

    def _policy(self, snap: Snapshot) -> Policy:
        st = self.config.settings()
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
        waiting = drs_history.backoffs(self.db, now)  # held out of the plan, and reported
        snap = self.snapshot(cooldown=True, now=now, waiting=waiting)
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
        marked = self.attention()
        unplaced = [
            *(u for u in result.unplaced if u["vm"] not in marked),
            *(
                {"vm": m.vm, "reason": f"its host {m.source} is down"}
                for m in result.moves
                if m.source in down
            ),
            *({"vm": vm, "reason": why} for vm, why in sorted(marked.items())),
        ]
        moving = {m.vm for m in moves}
        left = [
            *result.left,
            *({"vm": b.vm, "reason": b.reason} for b in waiting if b.vm not in moving),
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
            left=left,
        )

    def attention(self) -> dict[str, str]:
        """The VMs that need attention, each with why DRS leaves it where it is (the
        snapshot pins them)."""
        with self.db.session() as s:
            rows = s.scalars(select(Vm).where(Vm.attention.is_not(None)))
            return {v.name: f"needs attention, left where it is: {v.attention}" for v in rows}

    @staticmethod
    def _rec_out(
        r: Recommendation, waiting: dict[tuple[str, str], datetime] | None = None
    ) -> RecommendationOut:
        out = RecommendationOut.model_validate(r, from_attributes=True)
        if r.state == RecommendationState.FAILED and waiting:
            out.retry_after = waiting.get((r.vm, r.target))
        return out

    def recommendations(self, all_states: bool = False) -> list[RecommendationOut]:
        waiting = {(b.vm, b.target): b.until for b in drs_history.backoffs(self.db, self.clock())}
        with self.db.session() as s:
            q = select(Recommendation).order_by(Recommendation.id.desc()).limit(200)
            if not all_states:
                q = q.where(Recommendation.state == RecommendationState.PENDING)
            return [self._rec_out(r, waiting) for r in s.scalars(q)]

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
                    # When it ended, applied or failed: a failure starts its back-off then.
                    ended = state in (RecommendationState.APPLIED, RecommendationState.FAILED)
                    r.applied_at = self.clock() if ended else None

        async def body(task_id: int, cancel: asyncio.Event) -> tuple[OperationReport, str | None]:
            outcomes = await self.ops.run_waves(task_id, moves, cancel, self.config.recheck, record)
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
            report = OperationReport(kind=DRS_APPLY, moves=outcomes, spread=spread(outcomes))
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
        st = self.config.settings()
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
                st = await asyncio.to_thread(self.config.settings)
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
        (the migrations it started went on by themselves). Not while another replica's
        apply runs: they may be its."""
        with self.db.session() as s:
            if s.scalar(
                select(Task.id).where(Task.kind == DRS_APPLY, Task.state.in_(ACTIVE_TASK_STATES))
            ):
                return
            s.execute(
                update(Recommendation)
                .where(Recommendation.state == RecommendationState.APPLYING)
                .values(
                    state=RecommendationState.FAILED,
                    message="the manager restarted while applying; see the VM's tasks",
                )
            )

    def state(self, snap: Snapshot | None = None) -> DrsState:
        """The live imbalance and how many VMs break a must rule (``snap``: a caller's
        snapshot of the cluster without links, read once for more than this)."""
        now = self.clock()
        snap = snap or self.snapshot(now=now, links=False)
        state = ClusterState(snap, self._policy(snap).allocation_weight)
        book = RuleBook.build(snap)
        broken = book.violations(state, [r for r in snap.rules if r.strength == "must"])
        return DrsState(
            imbalance=state.imbalance(),
            broken_must_rules=sum(len(b) for _, b in broken),
            measured_vms=len(self.window.demand(now)),
        )
