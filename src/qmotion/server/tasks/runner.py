"""Long operations as persisted tasks: queueing per host, running the engine, cancelling.

At most ``per_host`` migrations involve a host at once (vMotion allows 4 on 1 GbE); more are
queued, not refused. Every step of a task is persisted with its phase, progress and events.
A live migration gets its id at submission (persisted with the task's machine state, sent on
every agent call of it); one that ends unsettled marks its VM for attention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any
from uuid import uuid4

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from qmotion.api.migration import (
    IncomingRequest,
    MigrationParams,
    MigrationPrediction,
    MigrationReport,
    MigrationStats,
    StepTime,
)
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.api.sizes import parse_rate_bytes
from qmotion.api.storage import MirrorStatus
from qmotion.api.vm import VmSpec
from qmotion.migration import engine, params
from qmotion.migration.errors import Refused, StepError
from qmotion.migration.prechecks import precheck
from qmotion.migration.timeline import summary
from qmotion.migration.vocabulary import MigrationState, Phase, Step
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Host, Task, TaskEvent, utcnow
from qmotion.server.errors import (
    Conflict,
    Invalid,
    LeaseLost,
    NotFound,
    Upstream,
    raise_refusals,
)
from qmotion.server.inventory import Inventory
from qmotion.server.replicas import Membership
from qmotion.server.tasks.disk_tasks import DiskTasks
from qmotion.server.tasks.ends import host_copy
from qmotion.server.tasks.flight import report
from qmotion.server.tasks.measure import measure
from qmotion.server.tasks.ownership import Ownership
from qmotion.server.tasks.planning import limits_of
from qmotion.server.tasks.port import AgentMigrationPort
from qmotion.server.tasks.shared_nothing import copy_plan
from qmotion.server.tasks.slots import Priority, Slots
from qmotion.server.tasks.task_view import task_out

log = logging.getLogger(__name__)
DEFAULT_PER_HOST = 4
# A claimed task: its id, whether its cancel was asked, and how it goes on.
Resumption = tuple[int, bool, Callable[[], Coroutine[Any, Any, None]]]
# How often a move waiting for a host slot held by another replica looks again.
CLUSTER_SLOT_POLL_S = 0.5
# A migration that ended before the guest's measurement did waits this long for it: the
# report keeps its prediction (the VM already runs where it ends).
PLAN_SETTLE_S = 1.0
# How a live migration's end phase reads as a task: the VM runs on the destination in both
# done and confirmation_pending (the latter with a warning and the VM marked for attention).
SETTLED = {
    Phase.DONE: TaskState.SUCCEEDED,
    Phase.CONFIRM_PENDING: TaskState.SUCCEEDED,
    Phase.CANCELLED: TaskState.CANCELLED,
}


class TaskRunner(Ownership, DiskTasks):
    """``clock``: monotonic seconds, for a live migration's port and report; ``sleep``: the
    waits of its retries and polls."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        per_host: int = DEFAULT_PER_HOST,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        membership: Membership | None = None,
    ):
        self.db, self.inventory, self.per_host, self.clock = db, inventory, per_host, clock
        self.sleep = sleep
        self._slots: dict[str, Slots] = {}
        self._cancel: dict[int, asyncio.Event] = {}
        self._running: dict[int, asyncio.Task[None]] = {}
        self.membership = membership or Membership(db)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called after each takeover with the kinds of the tasks it ended (operations).
        self.after_takeover: list[Callable[[list[str]], None]] = []
        self._leasing = False  # keep_leases runs: the guard applies

    def _migration_resumer(self, t: Task) -> Callable[[], Coroutine[Any, Any, None]]:
        persisted = MigrationState.from_json(t.machine or {})
        # Persisted before migrations had ids: the agents know no migration by a new one,
        # so it rolls back or goes forward on what they say.
        state = replace(persisted, migration_id=persisted.migration_id or uuid4().hex)
        task_id, vm, source, destination = t.id, t.vm or "", t.source or "", t.destination or ""
        mparams = MigrationParams.model_validate(t.params or {})
        return lambda: self._run_migration(
            task_id, vm, source, destination, mparams, self.clock(), resume=state
        )

    def spawn(self, task_id: int, cancel: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
        """Run a task's work in the background, cancellable through ``cancel``."""
        self._cancel[task_id] = cancel

        async def run() -> None:
            try:
                await work
            finally:
                self._forget(task_id)

        self._launch(task_id, run())

    # ------------------------------------------------------------------ submit

    def _check(
        self, vm: str, req: MigrateRequest, dry_run: bool = False
    ) -> tuple[str, MigrationParams]:
        """Synchronous pre-checks at submission: a refusal creates no task at all."""
        if dry_run and (req.to is None or req.datastore is not None):
            raise Invalid(
                "a dry run predicts a live migration of the memory to another host: give --to, "
                "without --datastore (a shared-nothing migration is not predicted)",
                field="datastore" if req.datastore else "to",
                vm=vm,
            )
        if req.to is None:
            raise Invalid("give the destination host", field="to", vm=vm)
        bandwidth = None
        if req.bandwidth:
            try:
                bandwidth = parse_rate_bytes(req.bandwidth)
            except ValueError as exc:
                raise Invalid(f"bandwidth: {exc}", field="bandwidth", vm=vm) from exc
        with self.db.session() as s:
            row = self.inventory.vm_by_name(s, vm)
            hosts = self.inventory.host_views(s)
            # The same input as the targets' verdict (refusals), so the two cannot drift.
            refusals = precheck(self._live_input(s, row, req.to, req.datastore, hosts))
            source = row.host.name
        raise_refusals(refusals, vm)
        chosen = params.choose(
            req.max_downtime_ms, bandwidth, req.timeout_s, allow_postcopy=req.allow_postcopy
        )
        if self.inventory.tls:
            chosen = chosen.model_copy(update={"tls": True, "tls_hostname": req.to})
        if req.datastore is not None:
            chosen = chosen.model_copy(
                update={"copy_datastore": req.datastore, "copy_format": req.disk_format}
            )
        chosen = chosen.model_copy(update={"destination_start": req.destination_start})
        return source, chosen

    async def _check_copy(self, vm: str, source: str, to: str, mparams: MigrationParams) -> None:
        """Shared-nothing: what the destination would refuse about the copies (its datastore,
        room for them) is refused here, not as a failed task."""

        def work() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, vm)
                spec = VmSpec.model_validate(row.spec)
                not_shared = self.inventory.not_shared(s, spec, source, to)
                src = host_copy(row.host)
                dst = host_copy(self.inventory.host_by_name(s, to))
            usage = self.inventory.call(src, lambda c: c.disks(vm), vm=vm)
            try:
                plan = copy_plan(spec, mparams, not_shared, usage)
            except ValueError as exc:
                raise Conflict(str(exc), vm=vm, host=source, field="datastore") from exc
            req = IncomingRequest(spec=spec, copy_disks=plan)
            self.inventory.call(dst, lambda c: c.incoming_check(req), vm=vm)

        await asyncio.to_thread(work)

    async def predict_migration(self, vm: str, req: MigrateRequest) -> MigrationPrediction:
        """``--dry-run``: the same checks and measurements as a migration, and nothing started."""
        source, mparams = await asyncio.to_thread(self._check, vm, req, True)
        to = req.to
        assert to is not None  # _check refused otherwise

        def hosts() -> tuple[Host, Host]:
            with self.db.session() as s:
                return (
                    host_copy(self.inventory.host_by_name(s, source)),
                    host_copy(self.inventory.host_by_name(s, to)),
                )

        src, dst = await asyncio.to_thread(hosts)
        try:
            _, prediction = await measure(
                self.db, self.inventory, vm, src, dst, limits_of(mparams), tls=mparams.tls
            )
        except StepError as exc:
            raise Upstream(str(exc), vm=vm, host=exc.host) from exc
        except Refused as exc:
            first = exc.refusals[0]
            raise Conflict(
                str(exc), code=first.code, vm=vm, host=first.host, field=first.field
            ) from exc
        return prediction

    async def submit_migration(self, vm: str, req: MigrateRequest) -> TaskOut:
        if req.to is not None and await asyncio.to_thread(self._stopped, vm):
            return await self.submit_cold(vm, req)
        if req.datastore is not None and (
            req.to is None or req.to == await asyncio.to_thread(self._host_of, vm)
        ):
            return await self.submit_storage_move(vm, req)
        accepted = self.clock()
        source, mparams = await asyncio.to_thread(self._check, vm, req)
        to = req.to
        assert to is not None  # _check refused otherwise
        if mparams.copy_datastore is not None:
            await self._check_copy(vm, source, to, mparams)

        def create() -> TaskOut:
            try:
                return insert()
            except IntegrityError as exc:
                # The unique index on active tasks: another submission won the race.
                raise Conflict(
                    f"VM {vm} is already migrating", code="already_migrating", vm=vm
                ) from exc

        migration_id = uuid4().hex

        def insert() -> TaskOut:
            # No read before the insert: on SQLite a read transaction that then writes fails
            # ("database is locked") when another writer committed meanwhile; the unique index
            # is the check.
            with self.db.session() as s:
                t = Task(
                    kind="migrate",
                    state=TaskState.QUEUED,
                    vm=vm,
                    source=source,
                    destination=to,
                    params=mparams.model_dump(),
                    phase=Phase.QUEUED,
                    machine=MigrationState(migration_id=migration_id).to_json(),
                )
                self.membership.stamp(t)
                s.add(t)
                s.flush()
                s.add(
                    TaskEvent(
                        task=t,
                        kind="queued",
                        message=f"live migration of {vm}: {source} -> {to}"
                        + (", high priority" if req.priority == "high" else ""),
                    )
                )
                return task_out(t, with_events=False)

        out = await asyncio.to_thread(create)
        self._cancel[out.id] = asyncio.Event()
        self._launch(
            out.id,
            self._run_migration(
                out.id,
                vm,
                source,
                to,
                mparams,
                accepted,
                migration_id,
                priority=req.priority or "normal",
            ),
        )
        return out

    # ------------------------------------------------------------------ run

    async def _run_migration(
        self,
        task_id: int,
        vm: str,
        source: str,
        destination: str,
        mparams: MigrationParams,
        accepted: float,
        migration_id: str | None = None,
        resume: MigrationState | None = None,
        priority: Priority = "normal",
    ) -> None:
        cancel = self._cancel[task_id]
        if resume is not None:
            migration_id = resume.migration_id
        first, second = sorted((source, destination))
        try:
            async with contextlib.AsyncExitStack() as held:
                taken = await self._take(
                    held, (first, second), priority, cancel if resume is None else None
                )
                started = resume is not None or (
                    taken
                    and not cancel.is_set()
                    and await self._begin(task_id, (first, second), cancel)
                )
                if not started:
                    await self.settle(
                        self._finish, task_id, TaskState.CANCELLED, "cancelled while queued", None
                    )
                    return
                queued_s = self.clock() - accepted

                async def postcopy_requested() -> None:
                    await asyncio.to_thread(self._mark_postcopy_requested, task_id)

                port = AgentMigrationPort(
                    self.db,
                    self.inventory,
                    vm,
                    source,
                    destination,
                    mparams,
                    self.clock,
                    migration_id=migration_id,
                    sleep=self.sleep,
                    on_postcopy_requested=postcopy_requested,
                    accepted=accepted,
                )
                # Submission checks, the task's row and the wait for host slots.
                port.watch.add("checks and queue", accepted, accepted + queued_s)
                if resume is not None:
                    port.stream_uri = resume.uri  # where a broken postcopy stream reconnects
                    port.postcopy_requested = resume.postcopy_requested

                async def persist(st: Step, stats: MigrationStats | None) -> None:
                    # The start's timeline goes with the first step persisted after the
                    # stream started: an event of its own, in that step's transaction.
                    timeline = port.flight.timeline if not port.timeline_recorded else None
                    await asyncio.to_thread(
                        self._persist,
                        task_id,
                        st,
                        stats,
                        port.disks.status,
                        port.postcopy_requested,
                        timeline or None,
                    )
                    if timeline:
                        port.timeline_recorded = True

                try:
                    final = await engine.run(
                        port,
                        persist,
                        cancel,
                        resume,
                        copy_disks=mparams.copy_datastore is not None,
                        migration_id=migration_id,
                        sleep=self.sleep,
                        guard=self.guard,
                    )
                    await port.settle_plan(PLAN_SETTLE_S)
                finally:
                    port.close()
                if final.attention is not None:
                    await self._attention(vm, final.attention, port.flight.warnings)
                result = report(port.flight, final, accepted, queued_s, self.clock(), port.ladder)
                state = SETTLED.get(final.phase, TaskState.FAILED)
                await self.settle(self._finish, task_id, state, final.error, result)
        except LeaseLost as exc:  # another replica goes on with it: nothing more here
            log.warning("task %d: %s; stopped here", task_id, exc)
        except Exception as exc:  # a bug must still end the task, visibly
            log.exception("task %d crashed", task_id)
            with contextlib.suppress(LeaseLost):
                await self.settle(
                    self._finish, task_id, TaskState.FAILED, f"internal error: {exc}", None
                )
        finally:
            self._forget(task_id)

    async def _attention(self, vm: str, reason: str, warnings: list[str]) -> None:
        """The VM is marked for attention (reconcile or an operator settles it); a failure
        to record it is a warning of the task, which ends regardless."""
        try:
            await asyncio.to_thread(self.inventory.set_attention, vm, reason)
        except Exception as exc:
            log.exception("could not mark %s for attention", vm)
            warnings.append(f"the VM could not be marked for attention ({reason}): {exc}")

    def _mark_postcopy_requested(self, task_id: int) -> None:
        """Persisted before postcopy is asked for: a restarted manager must know the
        destination may run with pages still on the source."""
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            t.machine = {**(t.machine or {}), "postcopy_requested": True}

    def _persist(
        self,
        task_id: int,
        st: Step,
        stats: MigrationStats | None,
        mirror: MirrorStatus | None = None,
        postcopy_requested: bool = False,
        timeline: list[StepTime] | None = None,
    ) -> None:
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            previous = t.phase
            if timeline:
                total = max(x.start_ms + x.ms for x in timeline)
                s.add(
                    TaskEvent(
                        task=t,
                        kind="timeline",
                        message=summary(timeline, total),
                        data={"steps": [x.model_dump() for x in timeline]},
                    )
                )
            # Never back to False: it was persisted before the asking, whatever the step says.
            asked = (
                postcopy_requested
                or st.state.postcopy_requested
                or bool((t.machine or {}).get("postcopy_requested"))
            )
            kept = (t.stats or {}).get("mirror")
            if mirror is not None:
                # Shared-nothing: the disk copy is the first half of the progress bar.
                kept = mirror.model_dump(mode="json")
                t.stats = {**(t.stats or {}), "mirror": kept}
                if mirror.total_bytes and st.state.phase == Phase.MIRROR:
                    done = 1.0 - mirror.remaining_bytes / mirror.total_bytes
                    t.progress = max(t.progress, min(done, 1.0) * 0.5)
            t.phase = st.state.phase.value
            t.machine = st.state.to_json() | {"postcopy_requested": asked}
            if stats is not None:
                before = (t.stats or {}).get("rung"), (t.stats or {}).get("downtime_limit_ms")
                if stats.rung and before != (stats.rung, stats.downtime_limit_ms):
                    # Each climb of the ladder is an event an operator can read back.
                    s.add(
                        TaskEvent(
                            task=t,
                            kind="rung",
                            message=f"rung {stats.rung}: downtime limit "
                            f"{stats.downtime_limit_ms} ms, throttle {stats.throttle_pct}%",
                            data={"rung": stats.rung, "downtime_limit_ms": stats.downtime_limit_ms},
                        )
                    )
                t.stats = stats.model_dump(mode="json") | ({"mirror": kept} if kept else {})
                if stats.total:
                    done = 1.0 - stats.remaining / stats.total
                    t.progress = max(t.progress, min(done, 0.99))
            if previous != t.phase:
                s.add(
                    TaskEvent(
                        task=t, kind="phase", message=st.note or t.phase, data={"phase": t.phase}
                    )
                )
            elif st.note and st.note != "switchover done":
                s.add(TaskEvent(task=t, kind="note", message=st.note))

    def _finish(
        self,
        task_id: int,
        state: TaskState,
        error: str | None,
        result: MigrationReport | None = None,
    ) -> None:
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            t.state, t.ended_at, t.error = state, utcnow(), error
            t.result = result.model_dump(mode="json") if result else None
            if state == TaskState.SUCCEEDED:
                t.progress = 1.0
            s.add(TaskEvent(task=t, kind=state, message=error or state, data=t.result))

    # ------------------------------------------------------------------ queries and cancel

    def get(self, task_id: int) -> TaskOut:
        with self.db.session() as s:
            t = s.get(Task, task_id)
            if t is None:
                raise NotFound(f"no task {task_id}")
            return task_out(t)

    def list(self, limit: int = 100, after: int | None = None) -> list[TaskOut]:
        """Newest first; ``after``: only tasks older than that id (the next page's)."""
        query = select(Task).order_by(Task.id.desc()).limit(limit)
        if after is not None:
            query = query.where(Task.id < after)
        with self.db.session() as s:
            rows = s.scalars(query)
            return [task_out(t, with_events=False) for t in rows]

    def cancel(self, task_id: int) -> TaskOut:
        with self.db.session() as s:
            t = s.get(Task, task_id)
            if t is None:
                raise NotFound(f"no task {task_id}")
            if t.state not in ACTIVE_TASK_STATES:
                raise Conflict(f"task {task_id} already ended ({t.state})")
            t.cancel_requested = True
            s.add(TaskEvent(task=t, kind="cancel", message="cancel requested"))
        event = self._cancel.get(task_id)
        if event is not None:
            event.set()
        return self.get(task_id)

    async def shutdown(self) -> None:
        """Every run stopped (as at a crash: left as persisted) before the caller ends the
        lease: another replica must not resume a task this one still drives."""
        await self.abandon_all()
