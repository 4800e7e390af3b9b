"""Scheduled operations: one-off or cron-timed manager actions, persisted, each run recorded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple, Protocol

from cronsim import CronSim
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from qmotion.api.schedule import (
    RUNS_SHOWN,
    RunOutcome,
    ScheduleAction,
    ScheduleCreate,
    ScheduleOut,
    ScheduleRunOut,
)
from qmotion.server.db import Database, Schedule, ScheduleRun, utcnow
from qmotion.server.errors import Invalid, ManagerError, NotFound

log = logging.getLogger(__name__)
# Runs kept per schedule: a cron firing every minute must not grow the database forever.
RUNS_KEPT = 200
Decision = Literal["wait", "run", "missed"]


def next_after(at: datetime | None, cron: str | None, after: datetime) -> datetime | None:
    """The schedule's first time strictly after ``after`` (UTC); None: it never fires again."""
    if at is not None and cron is not None:
        raise ValueError("a schedule has at or cron, not both")
    if cron is not None:
        try:
            return next(CronSim(cron, after.astimezone(UTC)))
        except (StopIteration, OverflowError):  # no match within cronsim's 50 years, or year 9999
            return None
    if at is not None and at > after:
        return at.astimezone(UTC)
    return None


def decide(next_run_at: datetime | None, now: datetime, grace_s: int) -> Decision:
    """What a schedule due at ``next_run_at`` does at ``now``: wait for it, run it, or
    (found later than ``grace_s`` after it: the manager was not running) record it missed."""
    if next_run_at is None or now < next_run_at:
        return "wait"
    return "run" if now - next_run_at <= timedelta(seconds=grace_s) else "missed"


class ScheduleActions(Protocol):
    """What a schedule can do; each starts a manager task and returns its id."""

    async def migrate(self, vm: str, to: str) -> int: ...

    async def drs(self) -> int: ...

    async def maintenance_enter(self, host: str) -> int: ...

    async def maintenance_exit(self, host: str) -> int: ...


def _out(s: Session, row: Schedule) -> ScheduleOut:
    runs = s.scalars(
        select(ScheduleRun)
        .where(ScheduleRun.schedule_id == row.id)
        .order_by(ScheduleRun.id.desc())
        .limit(RUNS_SHOWN)
    )
    return ScheduleOut(
        id=row.id,
        name=row.name,
        at=row.at,
        cron=row.cron,
        action=ScheduleAction(row.action),
        vm=row.vm,
        to=row.to,
        host=row.host,
        grace_s=row.grace_s,
        next_run_at=row.next_run_at,
        finished=row.next_run_at is None,
        created_at=row.created_at,
        last_run_at=row.last_run_at,
        runs=[
            ScheduleRunOut(
                at=r.at,
                ran_at=r.ran_at,
                outcome=_outcome(r.outcome),
                task_id=r.task_id,
                message=r.message,
            )
            for r in runs
        ],
    )


def _outcome(value: str) -> RunOutcome:
    if value == "started":
        return "started"
    if value == "missed":
        return "missed"
    return "failed"


class _Claim(NamedTuple):
    schedule_id: int
    due: datetime
    ran_at: datetime
    action: ScheduleAction
    vm: str | None
    to: str | None
    host: str | None


def _advance(
    s: Session, row: Schedule, due: datetime, to: datetime | None, ran_at: datetime | None
) -> bool:
    """``row``'s next run moved from ``due`` to ``to`` if nobody moved it first."""
    values: dict[str, datetime | None] = {"next_run_at": to}
    if ran_at is not None:
        values["last_run_at"] = ran_at
    done = s.execute(
        update(Schedule)
        .where(Schedule.id == row.id, Schedule.next_run_at == due)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        return False
    s.refresh(row)
    return True


def _arg(value: str | None, field: str) -> str:
    if value is None:  # the request was validated: only a hand-edited row lacks it
        raise Invalid(f"the schedule has no {field}", field=field)
    return value


def _record(
    s: Session,
    schedule_id: int,
    due: datetime,
    ran_at: datetime,
    outcome: RunOutcome,
    task_id: int | None,
    message: str,
) -> None:
    s.add(
        ScheduleRun(
            schedule_id=schedule_id,
            at=due,
            ran_at=ran_at,
            outcome=outcome,
            task_id=task_id,
            message=message,
        )
    )
    s.flush()
    oldest_kept = s.scalar(
        select(ScheduleRun.id)
        .where(ScheduleRun.schedule_id == schedule_id)
        .order_by(ScheduleRun.id.desc())
        .offset(RUNS_KEPT - 1)
        .limit(1)
    )
    if oldest_kept is not None:
        s.execute(
            delete(ScheduleRun).where(
                ScheduleRun.schedule_id == schedule_id, ScheduleRun.id < oldest_kept
            )
        )


class Schedules:
    """The schedules in the database, and the loop that runs them when due."""

    def __init__(
        self,
        db: Database,
        actions: ScheduleActions,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db, self.actions, self.clock = db, actions, clock
        # One tick at a time: two overlapping ticks could both find a run due.
        self._ticking = asyncio.Lock()

    def create(self, req: ScheduleCreate) -> ScheduleOut:
        now = self.clock()
        if req.at is not None and req.at <= now:
            raise Invalid(
                f"at: {req.at.isoformat()} is not in the future (now {now.isoformat()})",
                field="at",
            )
        first = next_after(req.at, req.cron, now)
        if first is None:
            raise Invalid(f"cron: {req.cron!r} never fires", field="cron")
        row = Schedule(
            name=req.name,
            at=req.at,
            cron=req.cron,
            action=req.action.value,
            vm=req.vm,
            to=req.to,
            host=req.host,
            grace_s=req.grace_s,
            next_run_at=first,
            created_at=now,
        )
        with self.db.session() as s:
            s.add(row)
            s.flush()
            return _out(s, row)

    def list(self) -> list[ScheduleOut]:
        with self.db.session() as s:
            return [_out(s, r) for r in s.scalars(select(Schedule).order_by(Schedule.id))]

    def get(self, schedule_id: int) -> ScheduleOut:
        with self.db.session() as s:
            return _out(s, self._row(s, schedule_id))

    def delete(self, schedule_id: int) -> None:
        with self.db.session() as s:
            row = self._row(s, schedule_id)
            # Explicitly: SQLite enforces the foreign key but not every backend cascades.
            s.execute(delete(ScheduleRun).where(ScheduleRun.schedule_id == row.id))
            s.delete(row)

    @staticmethod
    def _row(s: Session, schedule_id: int) -> Schedule:
        row = s.get(Schedule, schedule_id)
        if row is None:
            raise NotFound(f"no schedule {schedule_id}")
        return row

    async def tick(self) -> None:
        """Act on every schedule that is due now: run it, or record it missed (beyond grace).

        A run's slot is claimed (the schedule advanced and committed) before its action is
        called: if the manager dies in between, that run is lost rather than started twice.
        """
        async with self._ticking:
            now = self.clock()
            with self.db.session() as s:
                due = list(
                    s.scalars(
                        select(Schedule.id)
                        .where(Schedule.next_run_at.is_not(None), Schedule.next_run_at <= now)
                        .order_by(Schedule.next_run_at, Schedule.id)
                    )
                )
            for schedule_id in due:
                claim = self._claim(schedule_id, now)
                if claim is not None:
                    await self._run(claim)

    def _claim(self, schedule_id: int, now: datetime) -> _Claim | None:
        """The schedule's run due at ``now``, claimed; a missed run is recorded on the way.

        Each step is a compare-and-set on ``next_run_at``: of two replicas (or processes)
        reading the same due run, one advances it and the other finds it moved and stops.
        SQLite's driver runs a read outside the write's transaction, and PostgreSQL's read
        committed lets both read the old value, so a read-then-write would fire it twice."""
        with self.db.session() as s:
            row = s.get(Schedule, schedule_id)
            # Twice at most: skipping missed runs can land on a later one still within grace.
            while row is not None and row.next_run_at is not None:
                due = row.next_run_at
                decision = decide(due, now, row.grace_s)
                if decision == "wait":
                    return None
                if decision == "run":
                    if not _advance(s, row, due, next_after(row.at, row.cron, now), now):
                        return None
                    return _Claim(
                        row.id, due, now, ScheduleAction(row.action), row.vm, row.to, row.host
                    )
                # One record for all the runs beyond grace: the next is the first within it.
                cutoff = now - timedelta(seconds=row.grace_s, microseconds=1)
                if not _advance(s, row, due, next_after(row.at, row.cron, cutoff), None):
                    return None
                resume = (
                    f"; it runs next at {row.next_run_at.isoformat()}"
                    if row.next_run_at is not None
                    else ""
                )
                _record(
                    s,
                    row.id,
                    due,
                    now,
                    "missed",
                    None,
                    f"not run: found {(now - due).total_seconds():.0f} s after it was due, "
                    f"beyond its {row.grace_s} s grace (the manager was not running){resume}",
                )
        return None

    async def _run(self, claim: _Claim) -> None:
        outcome: RunOutcome = "failed"
        task_id: int | None = None
        try:
            task_id = await self._call(claim)
        except ManagerError as exc:
            message = exc.message
        except Exception as exc:  # recorded on the run: the other schedules still run
            log.exception("schedule %d: its action raised", claim.schedule_id)
            message = f"{type(exc).__name__}: {exc}"
        else:
            outcome, message = "started", f"task {task_id}"
        with self.db.session() as s:
            if s.get(Schedule, claim.schedule_id) is None:  # deleted while its action ran
                return
            _record(s, claim.schedule_id, claim.due, claim.ran_at, outcome, task_id, message)

    async def _call(self, c: _Claim) -> int:
        match c.action:
            case ScheduleAction.MIGRATE:
                return await self.actions.migrate(_arg(c.vm, "vm"), _arg(c.to, "to"))
            case ScheduleAction.DRS:
                return await self.actions.drs()
            case ScheduleAction.MAINTENANCE_ENTER:
                return await self.actions.maintenance_enter(_arg(c.host, "host"))
            case ScheduleAction.MAINTENANCE_EXIT:
                return await self.actions.maintenance_exit(_arg(c.host, "host"))

    async def run_forever(self, interval_s: float = 5.0) -> None:
        """Tick every ``interval_s`` seconds, the first time at once (a run missed while the
        manager was down is decided at start)."""
        while True:
            try:
                await self.tick()
            except Exception:  # the scheduler must outlive one bad round
                log.exception("schedule tick failed")
            await asyncio.sleep(interval_s)
