"""Cluster operations as tasks (DRS apply, maintenance): moves in waves, awaited, reported.

An operation is a task of its own (no VM) whose result is an ``OperationReport``: each VM it
tried to move, where it went or why not. Its moves are ordinary migration tasks submitted
through the task runner, so they get its pre-checks, its per-host limit (the runner queues the
rest) and its one-active-task per VM; the operation submits them in the plan's wave order, a
move only once the earlier moves out of its target host have ended, and waits. Cancelling the
operation stops it submitting; migrations already running finish or are cancelled on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from qmotion.api.drs import MoveOutcome, OperationReport
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.server.db import Database, Task, TaskEvent, utcnow
from qmotion.server.errors import LeaseLost, ManagerError
from qmotion.server.tasks.runner import TaskRunner
from qmotion.server.tasks.task_view import task_out

log = logging.getLogger(__name__)
POLL_S = 0.2
# A move re-checked just before it starts, given the operation's moves still planned (members
# of a must-affinity group move together; one skipped or failed is no longer planned) and
# those already submitted (under way, not yet in the inventory): None to go ahead, else why.
Recheck = Callable[["PlannedMove", Sequence["PlannedMove"], Sequence["PlannedMove"]], str | None]


# An operation's work: (its task id, its cancel event) -> (its report, its error if any).
OperationBody = Callable[[int, asyncio.Event], Awaitable[tuple[OperationReport, str | None]]]


@dataclass(frozen=True)
class PlannedMove:
    vm: str
    source: str
    target: str
    wave: int
    reason: str = ""


class Operations:
    def __init__(self, db: Database, runner: TaskRunner, poll_s: float = POLL_S) -> None:
        self.db, self.runner, self.poll_s = db, runner, poll_s

    def start(
        self,
        kind: str,
        host: str | None,
        message: str,
        body: OperationBody,
    ) -> TaskOut:
        """Insert the operation's task and run ``body(task_id, cancel)`` in the background;
        its report becomes the task's result, its error (if any) fails the task."""
        with self.db.session() as s:
            t = Task(kind=kind, state=TaskState.RUNNING, source=host, started_at=utcnow())
            self.runner.membership.stamp(t)
            s.add(t)
            s.flush()
            s.add(TaskEvent(task=t, kind="started", message=message))
            out = task_out(t, with_events=False)
        cancel = asyncio.Event()

        async def run() -> None:
            began = time.monotonic()
            try:
                report, error = await body(out.id, cancel)
                report.wall_ms = round((time.monotonic() - began) * 1000, 1)
                state = (
                    TaskState.CANCELLED
                    if cancel.is_set()
                    else TaskState.FAILED
                    if error
                    else TaskState.SUCCEEDED
                )
                await self.runner.settle(self._finish, out.id, state, error, report)
            except LeaseLost as exc:  # another replica ended it (a takeover): nothing more
                log.warning("operation %d: %s; stopped here", out.id, exc)
            except Exception as exc:  # a bug must still end the task, visibly
                log.exception("operation %d crashed", out.id)
                with contextlib.suppress(LeaseLost):
                    await self.runner.settle(
                        self._finish, out.id, TaskState.FAILED, f"internal error: {exc}", None
                    )

        self.runner.spawn(out.id, cancel, run())
        return out

    def _finish(
        self, task_id: int, state: TaskState, error: str | None, report: OperationReport | None
    ) -> None:
        with self.db.session() as s:
            t = self.runner.owned_task(s, task_id)
            t.state, t.ended_at, t.error = state, utcnow(), error
            t.progress = 1.0 if state == TaskState.SUCCEEDED else t.progress
            t.result = report.model_dump(mode="json") if report else None
            s.add(TaskEvent(task=t, kind=state, message=error or state, data=t.result))

    def event(self, task_id: int, message: str, progress: float | None = None) -> None:
        with self.db.session() as s:
            t = self.runner.owned_task(s, task_id)
            if progress is not None:
                t.progress = max(t.progress, min(progress, 0.99))
            s.add(TaskEvent(task=t, kind="note", message=message))

    async def run_waves(
        self,
        task_id: int,
        moves: Sequence[PlannedMove],
        cancel: asyncio.Event,
        recheck: Recheck,
        on_done: Callable[[MoveOutcome], None] | None = None,
    ) -> list[MoveOutcome]:
        """Submit the moves (each re-checked first) in wave order, a move as soon as the
        earlier-wave moves out of its target have ended (it may need the memory they free);
        the task runner's per-host limit holds the rest in its queue. Waits for them all."""
        out: list[MoveOutcome] = []
        total = max(len(moves), 1)
        pending = sorted(moves, key=lambda m: m.wave)
        running: dict[int, PlannedMove] = {}
        started: list[PlannedMove] = []
        ended: set[str] = set()  # VMs whose move ended (or never started)
        failed: set[str] = set()  # ... without moving

        def finish(done: MoveOutcome) -> None:
            out.append(done)
            ended.add(done.vm)
            if done.outcome != "moved":
                failed.add(done.vm)
            if on_done:
                on_done(done)

        while pending or running:
            for m in list(pending):
                if cancel.is_set():
                    break
                frees = [x for x in moves if x.wave < m.wave and x.source == m.target]
                if any(x.vm not in ended for x in frees):
                    continue
                pending.remove(m)
                planned = [x for x in moves if x.vm not in failed]
                why = await asyncio.to_thread(recheck, m, planned, started)
                if why is not None:
                    finish(
                        MoveOutcome(
                            vm=m.vm, source=m.source, target=m.target, outcome="skipped", reason=why
                        )
                    )
                    continue
                try:
                    t = await self.runner.submit_migration(m.vm, MigrateRequest(to=m.target))
                except ManagerError as exc:
                    finish(
                        MoveOutcome(
                            vm=m.vm,
                            source=m.source,
                            target=m.target,
                            outcome="skipped",
                            reason=f"refused: {exc.message}",
                        )
                    )
                    continue
                running[t.id] = m
                started.append(m)
                await asyncio.to_thread(
                    self.event,
                    task_id,
                    f"{m.vm}: {m.source} -> {m.target} (wave {m.wave}, task {t.id})",
                )
            if cancel.is_set() and not running:
                break
            if not running:
                continue  # a move skipped just now may unblock others
            await asyncio.sleep(self.poll_s)
            for tid, m in list(running.items()):
                t = await asyncio.to_thread(self.runner.get, tid)
                if t.state.active:
                    continue
                del running[tid]
                ok = t.state == TaskState.SUCCEEDED
                finish(
                    MoveOutcome(
                        vm=m.vm,
                        source=m.source,
                        target=m.target,
                        outcome="moved" if ok else "failed",
                        task_id=tid,
                        reason=None if ok else (t.error or t.state.value),
                    )
                )
                await asyncio.to_thread(
                    self.event, task_id, f"{m.vm}: {t.state}", progress=len(out) / total
                )
        return out

    async def wait(self, task_id: int) -> TaskOut:
        """Until the task ends. Not bounded here: every migration task ends by itself (its
        completion and progress timeouts)."""
        while True:
            t = await asyncio.to_thread(self.runner.get, task_id)
            if not t.state.active:
                return t
            await asyncio.sleep(self.poll_s)


def spread(outcomes: Sequence[MoveOutcome]) -> dict[str, int]:
    """How many VMs an operation moved to each host (an ``OperationReport``'s spread)."""
    out: dict[str, int] = {}
    for o in outcomes:
        if o.outcome == "moved" and o.target:
            out[o.target] = out.get(o.target, 0) + 1
    return dict(sorted(out.items()))
