"""Maintenance mode: a host takes no new VMs and its VMs are evacuated where DRS spreads them.

``enter``: the host turns ``entering-maintenance`` (refused as a destination by the pre-checks,
skipped by placement and DRS), and an operation task moves its VMs: DRS's mandatory moves
(each to the host that leaves the cluster most balanced, within capacity and the must rules),
in waves within the per-host migration limit, each re-checked just before it starts. Up to
three rounds: a VM whose move failed is planned again on the cluster as it is then, never onto
the host where it failed (unless no other fits). Migrations already under way out of the host
(an operator's, or the moves of an evacuation a restarted manager began) are awaited, not
counted as failures. Every VM that left the host since the maintenance began, by whichever
task, is recorded as evacuated, so ``exit --return`` brings it back. When the host is empty at
the end it is ``maintenance``, whatever happened on the way; otherwise it stays
``entering-maintenance`` and the host and the task say which VMs did not leave and why:
maintenance never hangs silently. A must-affinity group split across hosts leaves together:
its members elsewhere move with it (or it joins them).
``exit`` is always possible: it stops an evacuation under way, and with ``return`` moves the
VMs the last maintenance evacuated (those still where it put them) back. Either way it is a
task (with no moves, it ends at once), so every exit has a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qmotion.api.drs import MaintenanceOut, MoveOutcome, OperationReport
from qmotion.api.server import TaskState
from qmotion.drs.errors import SnapshotError
from qmotion.drs.model import Policy
from qmotion.drs.planner import plan
from qmotion.drs.rules import RuleBook
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.operations import OperationBody, Operations, PlannedMove, spread
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Host, HostMaintenance, Task, Vm
from qmotion.server.errors import Conflict, NotFound
from qmotion.server.tasks.runner import TaskRunner
from qmotion.server.tasks.task_view import COLD_MIGRATE, MAINTENANCE, MAINTENANCE_EXIT

log = logging.getLogger(__name__)
ROUNDS = 3


class Maintenance:
    def __init__(
        self, db: Database, runner: TaskRunner, drs: ClusterDrs, operations: Operations
    ) -> None:
        self.db, self.runner, self.drs, self.ops = db, runner, drs, operations

    @staticmethod
    def _host(s: Session, name: str) -> Host:
        h = s.scalars(select(Host).where(Host.name == name)).first()
        if h is None:
            raise NotFound(f"no host named {name!r}", host=name)
        return h

    def status(self, name: str) -> MaintenanceOut:
        with self.db.session() as s:
            h = self._host(s, name)
            row = s.get(HostMaintenance, name)
            return MaintenanceOut(
                host=name,
                state=h.state,
                task_id=row.task_id if row else None,
                reason=row.reason if row else None,
            )

    def _cancel(self, task_id: int) -> None:
        with contextlib.suppress(Conflict):  # it ended meanwhile: nothing to stop
            self.runner.cancel(task_id)

    def _active_task(self, name: str) -> int | None:
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            if row is None or row.task_id is None:
                return None
            t = s.get(Task, row.task_id)
            return t.id if t is not None and TaskState(t.state).active else None

    # ------------------------------------------------------------------ enter

    def enter(self, name: str) -> MaintenanceOut:
        with self.db.session() as s:
            h = self._host(s, name)
            if h.state == "maintenance":
                return self.status(name)
            if h.state == "down":
                raise Conflict(
                    f"host {name} is down: its VMs cannot be migrated live",
                    code="host_down",
                    host=name,
                )
            fresh = h.state == "up"  # not a retry or resumption (see below)
            row = s.get(HostMaintenance, name)
            task = s.get(Task, row.task_id) if row is not None and row.task_id else None
            active = task is not None and TaskState(task.state).active
            if active and task is not None and task.kind == MAINTENANCE:
                return self.status(name)  # already evacuating
            exiting = task.id if active and task is not None else None
            fresh = fresh and exiting is None  # VMs an exit is bringing back stay recorded
        with self.db.session() as s:
            h = self._host(s, name)
            # Only from a state checked above: a refresh may have marked it down meanwhile.
            moved = s.execute(
                update(Host)
                .where(Host.id == h.id, Host.state.in_(("up", "entering-maintenance")))
                .values(state="entering-maintenance")
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise Conflict(f"host {name} changed state meanwhile", host=name)
        if exiting is not None:
            self._cancel(exiting)  # an `exit --return` under way: stop bringing VMs in
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            if row is None:
                row = HostMaintenance(host=name, evacuated={})
                s.add(row)
            row.reason = None
            if fresh:
                # A retry (or a resumed evacuation) keeps what was moved away already, so
                # `exit --return` brings those back too.
                row.evacuated = {}
        task_out = self.ops.start(
            MAINTENANCE, name, f"maintenance: evacuating {name}", self._evacuation(name)
        )
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            assert row is not None
            row.task_id = task_out.id
        return self.status(name)

    def _evacuation(self, name: str) -> OperationBody:
        async def body(task_id: int, cancel: asyncio.Event) -> tuple[OperationReport, str | None]:
            outcomes: list[MoveOutcome] = []
            why: dict[str, str] = {}
            try:
                await self._rounds(name, task_id, cancel, outcomes, why)
            except Exception:
                # A bug or a lost database must not leave an empty host short of maintenance.
                await asyncio.to_thread(self._departures, name, task_id)
                remaining = await asyncio.to_thread(self._remaining, name)
                reason = "; ".join(f"{vm}: evacuation failed" for vm in remaining) or None
                await asyncio.to_thread(self._settle, name, task_id, reason)
                raise
            if cancel.is_set():
                # Exited: the host is back in service and may take new VMs; only record
                # what left meanwhile (the exit waits for what is still leaving).
                await asyncio.to_thread(self._departures, name, task_id)
            else:
                await self._settled_departures(name, task_id, cancel)
            remaining = await asyncio.to_thread(self._remaining, name)
            for vm in remaining:
                if vm not in why:
                    why[vm] = (
                        "the evacuation was cancelled"
                        if cancel.is_set()
                        else why.get("*", "not moved")
                    )
                    outcomes.append(
                        MoveOutcome(
                            vm=vm, source=name, target=None, outcome="unplaced", reason=why[vm]
                        )
                    )
            reason = "; ".join(f"{vm}: {why[vm]}" for vm in remaining) or None
            await asyncio.to_thread(self._settle, name, task_id, reason)
            report = OperationReport(
                kind=MAINTENANCE,
                host=name,
                moves=outcomes,
                spread=spread(outcomes),
                remaining=remaining,
            )
            if cancel.is_set():
                return report, None  # cancelled (by exit): the task says so
            return report, (f"{name} is not empty: {reason}" if reason else None)

        return body

    async def _rounds(
        self,
        name: str,
        task_id: int,
        cancel: asyncio.Event,
        outcomes: list[MoveOutcome],
        why: dict[str, str],
    ) -> None:
        failed_on: dict[str, set[str]] = {}  # VM -> hosts its move failed to
        for _ in range(ROUNDS):
            if cancel.is_set():
                break
            # Migrations already on their way in land first, then leave with the rest; those
            # on their way out (an operator's, a resumed evacuation's) are awaited.
            await self._settled_departures(name, task_id, cancel)
            if cancel.is_set():
                break
            try:
                moves, unplaced = await asyncio.to_thread(self._plan, name, failed_on)
            except SnapshotError as exc:
                why["*"] = f"DRS cannot plan: {exc}"
                break
            why.update(unplaced)
            if not moves:
                break
            done = await self.ops.run_waves(
                task_id, moves, cancel, self.drs.config.recheck, self._record
            )
            outcomes += done
            for o in done:
                if o.outcome == "moved":
                    why.pop(o.vm, None)
                else:
                    why[o.vm] = o.reason or o.outcome
                    if o.outcome == "failed" and o.target:
                        failed_on.setdefault(o.vm, set()).add(o.target)

    async def _settled_departures(
        self, name: str, task_id: int, cancel: asyncio.Event, out_only: bool = False
    ) -> None:
        """Wait for every migration into (unless ``out_only``) or out of the host under way
        (until cancelled), then record the VMs that left it since the maintenance began."""
        while not cancel.is_set():
            busy: list[int] = await asyncio.to_thread(self._moving, name, out_only)
            if not busy:
                break
            # Until the next look, or at once when an exit cancels the evacuation.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), self.ops.poll_s)
        await asyncio.to_thread(self._departures, name, task_id)

    def _moving(self, name: str, out_only: bool = False) -> list[int]:
        with self.db.session() as s:
            where = Task.source == name
            active = select(Task.id).where(
                where if out_only else where | (Task.destination == name),
                Task.kind != MAINTENANCE,
                Task.kind != MAINTENANCE_EXIT,
                Task.vm.is_not(None),
                Task.state.in_(ACTIVE_TASK_STATES),
            )
            return list(s.scalars(active))

    def _departures(self, name: str, task_id: int) -> None:
        """Record as evacuated every VM whose migration away from the host ended since its
        maintenance began (the first evacuation after the exit before ``task_id``, the
        evacuation or exit asking) and is still there."""
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            if row is None:
                return
            last_exit = s.scalars(
                select(Task.id)
                .where(Task.kind == MAINTENANCE_EXIT, Task.source == name, Task.id < task_id)
                .order_by(Task.id.desc())
            ).first()
            began = s.scalars(
                select(Task.created_at)
                .where(Task.kind == MAINTENANCE, Task.source == name, Task.id > (last_exit or 0))
                .order_by(Task.id)
            ).first()
            if began is None:
                return
            # Ended since: a migration under way when the maintenance began counts too.
            left = s.execute(
                select(Task.vm, Task.destination)
                .where(
                    Task.kind.in_(("migrate", COLD_MIGRATE)),
                    Task.source == name,
                    Task.state == TaskState.SUCCEEDED,
                    Task.ended_at >= began,
                )
                .order_by(Task.id)
            )
            where = {n: h for n, h in s.execute(select(Vm.name, Host.name).join(Vm.host))}
            found = dict(row.evacuated)
            for vm, dst in left:
                if vm is not None and dst is not None and where.get(vm) == dst and vm not in found:
                    found[vm] = dst
            if found != row.evacuated:
                row.evacuated = found

    def _plan(
        self, name: str, failed_on: dict[str, set[str]] | None = None
    ) -> tuple[list[PlannedMove], dict[str, str]]:
        snap = self.drs.snapshot(avoid=failed_on)
        # Threshold 1: only the mandatory moves (this host's VMs, must-rule fixes).
        result = plan(snap, Policy(threshold=1, max_moves=0), self.drs.clock())
        # This host's VMs, and the members of their must-affinity groups elsewhere (the
        # group may go to a third host: every member's move is part of the evacuation).
        book = RuleBook.build(snap)
        leaving = {v for m in result.moves if m.source == name for v in book.unit(m.vm)}
        moves = [
            PlannedMove(m.vm, m.source, m.target, m.wave, m.reason)
            for m in result.moves
            if m.vm in leaving
        ]
        on_host = {v.name for v in snap.vms if v.host == name}
        unplaced = {u["vm"]: u["reason"] for u in result.unplaced if u["vm"] in on_host}
        # A VM that needs attention stays (pinned): the task reports why.
        unplaced |= {vm: why for vm, why in self.drs.attention().items() if vm in on_host}
        return moves, unplaced

    def _record(self, o: MoveOutcome) -> None:
        if o.outcome != "moved" or o.target is None:
            return
        with self.db.session() as s:
            row = s.get(HostMaintenance, o.source)
            if row is not None:
                row.evacuated = {**row.evacuated, o.vm: o.target}

    def _remaining(self, name: str) -> list[str]:
        with self.db.session() as s:
            h = self._host(s, name)
            return sorted(v.name for v in h.vms)

    def _settle(self, name: str, task_id: int, reason: str | None) -> None:
        with self.db.session() as s:
            h = self._host(s, name)
            row = s.get(HostMaintenance, name)
            if h.state != "entering-maintenance" or row is None or row.task_id != task_id:
                return  # exited, or another evacuation took over, meanwhile
            if reason is None:
                h.state = "maintenance"
            row.reason = reason

    # ------------------------------------------------------------------ exit

    def exit(self, name: str, return_vms: bool = False) -> MaintenanceOut:
        with self.db.session() as s:
            h = self._host(s, name)
            if h.state not in ("maintenance", "entering-maintenance"):
                raise Conflict(f"host {name} is {h.state}, not in maintenance", host=name)
        evacuating = self._active_task(name)
        if evacuating is not None:
            self._cancel(evacuating)
        with self.db.session() as s:
            h = self._host(s, name)
            h.state = "up"
            row = s.get(HostMaintenance, name)
            if row is not None:
                row.reason = None

        async def body(task_id: int, cancel: asyncio.Event) -> tuple[OperationReport, str | None]:
            if evacuating is not None:
                # Its moves under way finish (or are cancelled) and are recorded first, so
                # the VMs they moved come back too.
                await self.ops.wait(evacuating)
            if return_vms:
                # And the moves leaving that it no longer waits for (those of an evacuation
                # a restarted manager began, an operator's): they come back too.
                await self._settled_departures(name, task_id, cancel, out_only=True)
            moves = await asyncio.to_thread(self._returns, name) if return_vms else []
            done = await self.ops.run_waves(task_id, moves, cancel, self.drs.config.recheck)
            failed = [o for o in done if o.outcome != "moved"]
            await asyncio.to_thread(
                self._forget, name, [o.vm for o in done if o.outcome == "moved"]
            )
            report = OperationReport(
                kind=MAINTENANCE_EXIT, host=name, moves=done, spread=spread(done)
            )
            error = "; ".join(f"{o.vm}: {o.reason}" for o in failed) or None
            return report, error

        what = "bringing its VMs back" if return_vms else "back in service"
        task = self.ops.start(MAINTENANCE_EXIT, name, f"maintenance exit of {name}: {what}", body)
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            if row is None:
                row = HostMaintenance(host=name, evacuated={})
                s.add(row)
            row.task_id = task.id
        return self.status(name)

    def _returns(self, name: str) -> list[PlannedMove]:
        """The VMs the last maintenance moved away that are still where it put them; every
        move targets this host, so its per-host limit makes the waves."""
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            evacuated = dict(row.evacuated) if row else {}
            where = {n: h for n, h in s.execute(select(Vm.name, Host.name).join(Vm.host))}
        back = [vm for vm in sorted(evacuated) if where.get(vm) == evacuated[vm]]
        return [
            PlannedMove(vm, evacuated[vm], name, i // self.runner.per_host, "return")
            for i, vm in enumerate(back)
        ]

    def _forget(self, name: str, returned: list[str]) -> None:
        with self.db.session() as s:
            row = s.get(HostMaintenance, name)
            if row is not None:
                row.evacuated = {k: v for k, v in row.evacuated.items() if k not in returned}

    def resume_after_restart(self) -> None:
        """Hosts left entering maintenance by a previous manager go on being evacuated.
        Call from within the event loop, after the task runner's recovery."""
        with self.db.session() as s:
            names = [
                h.name for h in s.scalars(select(Host).where(Host.state == "entering-maintenance"))
            ]
        for name in names:
            log.info("resuming the evacuation of %s", name)
            self.enter(name)
