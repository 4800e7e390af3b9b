"""One campaign run: the starting cluster, the operations one after another (each while the
earlier ones may still run), faults at the agents' requests, then the settling and the final
invariants (tests.unit.campaign.checks).

Each operation is what an operator or DRS asks of the manager's API: a live migration, a
shared-nothing move, a storage move, a cancel, a DRS apply (a placement rule, then the moves
DRS plans for it), entering or leaving maintenance. After it, the run goes on for its
``run_for`` agent requests (or until no task runs), then the next. A manager that died is
started again (on the same database) a moment later. At the end the faults stop, every agent
is back, the tasks are let end, and reconcile rounds run until they change nothing; the final
invariants are checked, then what an operator does next (``vm resolve`` of each marked VM,
maintenance left) and one more move of every VM, which must succeed (nothing the run left
locks a VM for good), and the final invariants once more.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from qmotion.api.drs import RuleCreate
from qmotion.api.server import MigrateRequest, TaskOut
from qmotion.api.vm import Disk
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Host, Task, Vm
from qmotion.server.errors import ManagerError
from qmotion.server.reconcile import Unknown
from qmotion.server.tasks.task_view import DRS_APPLY, MAINTENANCE, MAINTENANCE_EXIT, task_out
from tests.unit.agent_world import _facts
from tests.unit.campaign import simloop
from tests.unit.campaign.invariants import final_violations
from tests.unit.campaign.manager import NEVER_DOWN_S, Manager
from tests.unit.campaign.schedule import HOSTS, SHARED, Generator, Op, Schedule, View, _short
from tests.unit.campaign.world import CampaignWorld, Injected, Key, ManagerCrashed

POLL_S = 0.25
RESTART_S = 3.0  # a dead manager is started again this long after
STEP_LIMIT_S = 3600.0  # an operation's run_for never waits longer (simulated)
SETTLE_S = 4 * 3600.0  # every task ends within this (simulated) at the end
RECONCILE_ROUNDS = 6
GIB = 1 << 30
RULE = "campaign"
# Progress queries before QEMU completes a migration by itself: the window in which a
# fault, a cancel or QEMU completing "at that moment" can strike one.
POLLS_TO_COMPLETE = 6


@dataclass
class Outcome:
    schedule: Schedule
    violations: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)  # kind: outcome
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    checks: int = 0
    restarts: int = 0
    sim_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # each operation and how it went
    broke_at: int | None = None  # the operation during which an invariant broke
    world: CampaignWorld | None = None  # as the run left it
    tasks: list[TaskOut] = field(default_factory=list)  # the run's tasks, at the end
    # As the run settled, before the operator's moves: where each VM runs, who defines it.
    settled: dict[str, list[str]] = field(default_factory=dict)
    defined: dict[str, list[str]] = field(default_factory=dict)
    marked: dict[str, str] = field(default_factory=dict)  # VM -> its attention mark

    @property
    def steps(self) -> int:
        return len(self.schedule.ops)


def _facts_of(host: str) -> dict[str, object]:
    stores = [
        {"name": SHARED, "path": "/srv/shared", "shared": True},
        {"name": f"local-{host}", "path": "/srv/local", "shared": False},
    ]
    return _facts() | {"cpus": 4, "memory_bytes": 8 * GIB, "datastores": stores}


class Run:
    """A run of ``schedule``: its operations replayed, then (with ``generator``) new ones
    drawn until there are ``steps``; faults from the schedule, or drawn and recorded."""

    def __init__(
        self,
        schedule: Schedule,
        generator: Generator | None,
        steps: int,
        folder: Path,
        world: type[CampaignWorld] = CampaignWorld,
    ) -> None:
        self.schedule, self.generator, self.steps = schedule, generator, steps
        self.url = f"sqlite:///{folder / 'manager.db'}"
        self.world = world(hosts=HOSTS, polls_to_complete=POLLS_TO_COMPLETE)
        self.outcome = Outcome(schedule)
        self.world.plan = self._plan
        self._me: asyncio.Task[object] | None = None
        self._cancel: tuple[int, int] | None = None  # (at request, task) the operator cancels
        self.verbose = False

    def _plan(self, key: Key, world: CampaignWorld) -> Injected | None:
        if key in self.schedule.faults or self.generator is None:
            return self.schedule.faults.get(key)
        fault = self.generator.fault(key, world)
        if fault is not None:
            self.schedule.faults[key] = fault
        return fault

    # ---------------------------------------------------------------- the run

    def run(self) -> Outcome:
        logging.getLogger("qmotion").setLevel(logging.CRITICAL)
        w = self.world
        simloop.run(self._main(), w.clock.monotonic, w.advance)
        out = self.outcome
        out.violations = list(w.violations)
        out.requests, out.checks, out.sim_s = len(w.requests), w.checks, w.clock.t - 1000.0
        out.faults = Counter(str(f.fault) for _, f in w.injected)
        # What struck is the schedule's fault list (a recorded fault never reached is none).
        out.schedule = replace(self.schedule, faults=dict(w.injected))
        out.world = w
        return out

    async def _main(self) -> None:
        self._me = asyncio.current_task()
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        self._set_up()
        self.manager = Manager(self.world, self.url, 1)
        self.manager.configure()
        self.manager.start()
        self.world.on_crash = self._crashed
        self.world.faults_on = True
        try:
            for i in range(self.steps):
                if self.world.violations:
                    break
                await self._alive()
                if i < len(self.schedule.ops):
                    op = self.schedule.ops[i]
                elif self.generator is not None:
                    op = self.generator.op(self._view())
                    self.schedule.ops.append(op)
                else:
                    break
                await self._perform(op)
                await self._run_for(op.run_for)
                await self._pause(op.gap_s)
                if self.world.violations:
                    self.outcome.broke_at = i
            self.world.faults_on = False
            if not self.world.violations:
                await self._settle()
            observer = Database(self.url)
            if not self.world.violations:
                self.world.violations += final_violations(self.world, observer)
            with observer.session() as s:
                self.outcome.tasks = [task_out(t) for t in s.query(Task).order_by(Task.id)]
                marks = {v.name: v.attention for v in s.query(Vm) if v.attention}
                self.outcome.marked = marks
            names = sorted({n for here in self.world.vms.values() for n in here})
            self.outcome.settled = {n: self.world.running_copies(n) for n in names}
            self.outcome.defined = {
                n: sorted(h for h in HOSTS if n in self.world.vms[h]) for n in names
            }
            if not self.world.violations:
                await self._operator_then_every_vm_moves()
            if not self.world.violations:
                self.world.violations += final_violations(self.world, observer)
            observer.engine.dispose()
        finally:
            self.world.faults_on = False
            self.manager.kill({t for t in (self._me,) if t is not None})
            self.manager.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """A task of a dead manager died with it; anything else is noted (the API's logs)."""
        exc = context.get("exception")
        if not isinstance(exc, ManagerCrashed | asyncio.CancelledError):
            self.outcome.notes.append(f"event loop: {context.get('message')}: {exc!r}")

    def _set_up(self) -> None:
        db = Database(self.url)
        for h in HOSTS:
            self.world.facts_override[h] = _facts_of(h)
        self.world.register_hosts(db)
        for p in self.schedule.placed:
            disk = Disk(datastore=p.datastore, path=f"{p.vm}/disk0.qcow2", bootable=True)
            self.world.add_running_vm(db, p.vm, p.host, memory_mib=p.memory_mib, disks=[disk])
            self.world.place(p.vm, p.host)
        db.engine.dispose()

    def _crashed(self, generation: int) -> None:
        """The manager died at a request (inside its call): it stops now, whole."""
        if self.manager.generation == generation and not self.manager.dead:
            self.manager.kill({t for t in (self._me,) if t is not None})

    async def _alive(self) -> None:
        if not self.manager.dead:
            return
        self.manager.close()
        await asyncio.sleep(RESTART_S)
        self.outcome.restarts += 1
        self.manager = Manager(self.world, self.url, self.manager.generation + 1)
        self.manager.start()

    # ---------------------------------------------------------------- operations

    async def _perform(self, op: Op) -> None:
        self._cancel = None
        try:
            outcome = await self._submit(op)
        except ManagerError as exc:
            outcome = f"refused ({exc.code})"
            self.outcome.notes.append(f"refused: {exc.message}") if self.verbose else None
        except ManagerCrashed:
            outcome = "manager died"
        except Exception as exc:  # the API would answer 500: a finding, not a stop
            outcome = "API error"
            self.outcome.notes.append(f"{op}: {type(exc).__name__}: {exc}")
        self.outcome.ops[f"{op.kind}: {outcome}"] += 1
        self.outcome.log.append(f"{self.world.clock.t - 1000:9.2f} {_short(op)}: {outcome}")

    async def _submit(self, op: Op) -> str:
        m = self.manager
        if op.kind == "wait":
            return "waited"
        if op.kind in ("migrate", "move", "storage"):
            assert op.vm is not None
            req = MigrateRequest(to=op.to, datastore=op.datastore)
            self._will_cancel(op, (await m.runner.submit_migration(op.vm, req)).id)
            return "submitted"
        if op.kind == "cancel":
            task = await asyncio.to_thread(self._active_task, op.vm or "")
            if task is None:
                return "nothing to cancel"
            m.runner.cancel(task)
            return "cancelled"
        if op.kind == "drs":
            if any(r.name == RULE for r in m.drs.config.list_rules()):
                m.drs.config.delete_rule(RULE)
            rule = RuleCreate(name=RULE, kind="run-on", vms=list(op.vms), hosts=list(op.hosts))
            m.drs.config.create_rule(rule)
            self._will_cancel(op, (await m.drs.run_and_apply()).id)
            return "applied"
        if op.kind == "enter":
            self._will_cancel(op, m.maintenance.enter(op.hosts[0]).task_id)
            return "entering"
        m.maintenance.exit(op.hosts[0], return_vms=op.back)
        return "exiting"

    def _will_cancel(self, op: Op, task: int | None) -> None:
        if op.cancel_at is not None and task is not None:
            self._cancel = (len(self.world.requests) + op.cancel_at, task)

    async def _cancel_due(self) -> None:
        """The operator's cancel of the operation's task, once its requests came."""
        if self._cancel is None or len(self.world.requests) < self._cancel[0]:
            return
        task, self._cancel = self._cancel[1], None
        try:
            self.manager.runner.cancel(task)
            outcome = "cancelled"
        except ManagerError as exc:
            outcome = f"refused ({exc.code})"
        except ManagerCrashed:
            outcome = "manager died"
        self.outcome.ops[f"cancel: {outcome}"] += 1
        self.outcome.log.append(f"{self.world.clock.t - 1000:9.2f}   cancel: {outcome}")

    def _active_task(self, target: str) -> int | None:
        """The active task of VM ``target``, or the latest operation of kind ``target``."""
        with self.manager.db.session() as s:
            q = s.query(Task).filter(Task.state.in_(ACTIVE_TASK_STATES))
            q = q.filter(Task.vm == target) if target.startswith("vm") else q.filter_by(kind=target)
            t = q.order_by(Task.id.desc()).first()
            return t.id if t is not None else None

    def _view(self) -> View:
        db = Database(self.url)
        try:
            with db.session() as s:
                rows = list(s.query(Vm))
                where = {v.name: v.host.name for v in rows}
                disks = {v.name: tuple(d["datastore"] for d in v.spec["disks"]) for v in rows}
                active = list(s.query(Task).filter(Task.state.in_(ACTIVE_TASK_STATES)))
                hosts = s.query(Host).filter(
                    Host.state.in_(("maintenance", "entering-maintenance"))
                )
                held = tuple(sorted(h.name for h in hosts))
        finally:
            db.engine.dispose()
        kinds = (DRS_APPLY, MAINTENANCE, MAINTENANCE_EXIT)
        return View(
            where=where,
            disks=disks,
            busy={t.vm: t.id for t in active if t.vm},
            operations=tuple(sorted(t.kind for t in active if t.kind in kinds)),
            maintenance=held,
        )

    async def _run_for(self, requests: int) -> None:
        target = len(self.world.requests) + requests
        limit = self.world.clock.t + STEP_LIMIT_S
        while not self.world.violations and self.world.clock.t < limit:
            await self._alive()
            await self._cancel_due()
            if requests and len(self.world.requests) >= target:
                return
            if not self.manager.runner._running:
                return
            await asyncio.sleep(POLL_S)

    async def _pause(self, seconds: float) -> None:
        end = self.world.clock.t + seconds
        while not self.world.violations and self.world.clock.t < end:
            await self._alive()
            await self._cancel_due()
            await asyncio.sleep(min(POLL_S, end - self.world.clock.t))

    # ---------------------------------------------------------------- the end

    async def _settle(self) -> None:
        """Faults stop, every agent is back, the tasks end, reconcile settles the rest."""
        w = self.world
        with w.lock:
            for host in sorted(w.down):
                w.restart_agent(host)
            w.down_until.clear()
            w.unreachable.clear()
            w.unreachable_until.clear()
            w.watch("all agents back")
        limit = w.clock.t + SETTLE_S
        while not w.violations:
            await self._alive()
            if not self.manager.runner._running or w.clock.t >= limit:
                break
            await asyncio.sleep(POLL_S)
        if self.manager.runner._running:
            w.violations.append(f"tasks still running {SETTLE_S:.0f} s after the faults stopped")
            return
        stuck = self._stuck_tasks()
        if stuck:
            w.violations.append(f"tasks left active with nothing running them: {stuck}")
            return
        m = self.manager
        for _ in range(RECONCILE_ROUNDS):
            m.inventory.refresh_hosts(NEVER_DOWN_S)
            acted = [a for a in m.reconciler.run() if not isinstance(a, Unknown)]
            w.watch("after a reconcile round")
            if not acted:
                break
        else:
            w.violations.append(f"reconcile still acting after {RECONCILE_ROUNDS} rounds")

    async def _operator_then_every_vm_moves(self) -> None:
        """Liveness: nothing the run left locks a VM for good. What an operator does after
        it (``vm resolve --keep`` where the inventory says for each marked VM, maintenance
        left, the placement rule dropped), then each VM is moved once, with no faults: each
        move must succeed (an agent still holding an unsettled record of a move refuses)."""
        m, w = self.manager, self.world
        for host in self._view().maintenance:
            m.maintenance.exit(host, return_vms=False)
        await self._wait_tasks()
        if any(r.name == RULE for r in m.drs.config.list_rules()):
            m.drs.config.delete_rule(RULE)
        with m.db.session() as s:
            marked = [(v.name, v.host.name, v.attention) for v in s.query(Vm) if v.attention]
        for name, host, why in marked:
            try:
                await asyncio.to_thread(m.inventory.resolve_vm, name, host)
            except ManagerError as exc:
                w.violations.append(f"{name} ({why}): vm resolve --keep {host}: {exc.message}")
                return
        view = self._view()
        for name in sorted(view.where):
            here = view.where[name]
            to = next(h for h in HOSTS if h != here)
            local = any(d != SHARED for d in view.disks[name])
            req = MigrateRequest(to=to, datastore=f"local-{to}" if local else None)
            try:
                task = (await m.runner.submit_migration(name, req)).id
            except ManagerError as exc:
                w.violations.append(f"{name} on {here} can no longer move: {exc.message}")
                return
            await self._wait_tasks()
            with m.db.session() as s:
                t = s.get(Task, task)
                assert t is not None
                if t.state != "succeeded":
                    w.violations.append(f"{name} on {here} can no longer move: {t.error}")
                    return
            w.watch(f"{name} moved after the run")

    async def _wait_tasks(self) -> None:
        limit = self.world.clock.t + SETTLE_S
        while self.manager.runner._running and self.world.clock.t < limit:
            await self._alive()
            await asyncio.sleep(POLL_S)

    def _stuck_tasks(self) -> list[str]:
        with self.manager.db.session() as s:
            active = s.query(Task).filter(Task.state.in_(ACTIVE_TASK_STATES))
            return [f"{t.id} {t.kind} {t.vm or ''} {t.state}" for t in active]


def run(
    schedule: Schedule,
    generator: Generator | None = None,
    steps: int | None = None,
    keep: Path | None = None,
    world: type[CampaignWorld] = CampaignWorld,
) -> Outcome:
    """Run ``schedule`` (replayed; with ``generator``, extended to ``steps`` operations);
    ``keep``: the manager's database is left in that folder (to look into); ``world``: the
    agents (a test plants a bug in them to see the campaign find it)."""
    n = steps if steps is not None else len(schedule.ops)
    if keep is not None:
        return Run(schedule, generator, n, keep, world).run()
    with tempfile.TemporaryDirectory(prefix="qmotion-campaign-") as folder:
        return Run(schedule, generator, n, Path(folder), world).run()
