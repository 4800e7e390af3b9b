"""Which manager replica runs each task: joining, renewing, taking over orphaned tasks,
fencing every step's write, the guard before each action, and slots counted cluster-wide.

Mixed into the TaskRunner (as DiskTasks is); the leases themselves are server/replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from qmotion.api.server import TaskState
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Host, Task, TaskEvent, utcnow
from qmotion.server.errors import LeaseLost
from qmotion.server.replicas import SELF_FENCE, Membership
from qmotion.server.tasks.task_view import OPERATION_KINDS

log = logging.getLogger(__name__)
# A claimed task: its id, whether its cancel was asked, and how it goes on.
Resumption = tuple[int, bool, Callable[[], Coroutine[Any, Any, None]]]
# A claim round: the epoch it claimed under, the tasks it resumes, the kinds it ended.
Claimed = tuple[int, list[Resumption], list[str]]
# The epoch a task's run started under (its coroutine's context; threads inherit it).
RUN_EPOCH: contextvars.ContextVar[int] = contextvars.ContextVar("qmotion_run_epoch")
# How often a move waiting for a host slot held by another replica looks again.
CLUSTER_SLOT_POLL_S = 0.5


class Ownership:
    """Mixed into the TaskRunner: what it provides is declared here."""

    db: Database
    per_host: int
    membership: Membership
    after_takeover: list[Callable[[list[str]], None]]
    _cancel: dict[int, asyncio.Event]
    _running: dict[int, asyncio.Task[None]]
    _loop: asyncio.AbstractEventLoop | None
    _leasing: bool
    _tripped: asyncio.Event

    if TYPE_CHECKING:  # provided by DiskTasks and the TaskRunner, later in the MRO

        def _disk_task_resumer(
            self, s: Session, t: Task
        ) -> Callable[[], Coroutine[Any, Any, None]] | None: ...

        def _migration_resumer(self, t: Task) -> Callable[[], Coroutine[Any, Any, None]]: ...

    def recover_after_restart(self) -> None:
        """Join as a new epoch of this replica, then take over every orphaned task (this
        name's previous process's among them). Call from within the event loop."""
        self._loop = asyncio.get_running_loop()
        self.membership.join()
        self._start(self._claim_orphans())

    async def keep_leases(self) -> None:
        """Keep this replica's lease and take over orphaned tasks, until cancelled.

        The renewals run on a thread of their own (Membership.heartbeat), not in the event
        loop: a loop busy for seconds is not a dead replica, and a busy worker pool does not
        hold a renewal back. A replica whose lease ended (it stalled past it: a frozen
        process, or the database out of reach), whose name was taken, or which could not
        renew by the self-fence point, stops its own work at once (another replica may be
        resuming it), then joins again as a new epoch, which orphans its old tasks: it may
        claim them back."""
        self._loop = loop = asyncio.get_running_loop()
        me = self.membership
        self._leasing, self._tripped = True, asyncio.Event()
        stop = threading.Event()
        beat = threading.Thread(
            target=me.heartbeat,
            args=(stop, lambda: loop.call_soon_threadsafe(self._tripped.set)),
            name=f"lease-{me.name}",
            daemon=True,
        )
        beat.start()
        claims: asyncio.Future[None] | None = None
        failures = 0
        try:
            while True:
                # The next claim round, or the self-fence point, or a trip (the heartbeat
                # lost the lease, or a task's guard found the replica past its fence point).
                fence_in = me.renewed + me.lease_s * SELF_FENCE - me.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._tripped.wait(), max(0.05, min(me.lease_s / 3, fence_in))
                    )
                if me.lost or me.fenced() or self._tripped.is_set():
                    why = (
                        "its lease ended or its name was taken"
                        if me.lost
                        else f"no renewal for {me.monotonic() - me.renewed:.1f} s"
                    )
                    log.error("replica %s lost its lease (%s): its tasks stop", me.name, why)
                    me.lost = True  # the heartbeat pauses until the new epoch
                    if claims is not None:  # a claim in flight would start tasks after this
                        claims.cancel()
                        await asyncio.gather(claims, return_exceptions=True)
                    await self.abandon_all()
                    try:
                        await me.call(me.rejoin)
                    except Exception:
                        failures += 1
                        log.exception("replica %s: could not join again", me.name)
                        await asyncio.sleep(min(me.lease_s, 0.25 * 2**failures))
                        continue
                    failures = 0
                    self._tripped.clear()
                # Claims on their own: they wait for the worker pool, which a busy replica
                # fills with agent calls.
                if claims is None or claims.done():
                    claims = asyncio.ensure_future(self._claim_round())
        finally:
            stop.set()
            self._leasing = False
            if claims is not None:
                claims.cancel()

    async def _claim_round(self) -> None:
        """Cancels asked through other replicas, then orphaned tasks taken over."""
        try:
            for task_id in await asyncio.to_thread(self._cancels_asked):
                if (event := self._cancel.get(task_id)) is not None:
                    event.set()
            self._start(await asyncio.to_thread(self._claim_orphans))
        except Exception:
            log.exception("replica %s: taking over orphaned tasks failed", self.membership.name)

    async def guard(self) -> None:
        """Awaited before each action on the hosts: while this replica runs its leases, one
        past its self-fence point acts no more: its own run is cancelled here, as at a
        shutdown (the task is left as persisted, for whoever holds it next)."""
        if self._leasing and (self.membership.lost or self.membership.fenced()):
            self._tripped.set()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)

    def _claim_orphans(self) -> Claimed:
        """Orphaned tasks, claimed for this replica in one transaction: a migration or disk
        task under way resumes from its persisted state (vocabulary.Restarted); one that had
        not begun, or an operation, ends (what it started goes on by itself)."""
        me = self.membership
        work: list[Resumption] = []
        failed_kinds: list[str] = []
        with self.db.session() as s:
            me.bound_locks(s)
            for t in me.orphans(s):
                restarted = t.owner in (None, me.name)
                before = t.owner
                # Compare-and-set: on SQLite the read above ran outside this transaction,
                # and another replica may have claimed (or its owner ended) the task since.
                claimed = s.execute(
                    update(Task)
                    .where(
                        Task.id == t.id,
                        Task.state.in_(ACTIVE_TASK_STATES),
                        Task.owner.is_not_distinct_from(t.owner),
                        Task.owner_epoch.is_not_distinct_from(t.owner_epoch),
                    )
                    .values(owner=me.name, owner_epoch=me.epoch)
                    .execution_options(synchronize_session=False)
                )
                if not claimed.rowcount:  # type: ignore[attr-defined]
                    continue
                s.refresh(t)
                try:
                    # One task that cannot be resumed (its host removed, its record from an
                    # older release) must not stop the others' takeover.
                    with s.begin_nested():
                        kind = self._take_over_one(s, t, restarted, before, work)
                except Exception as exc:
                    log.exception("task %d could not be taken over", t.id)
                    t.state, t.ended_at = TaskState.FAILED, utcnow()
                    t.error = f"could not be resumed after its manager stopped: {exc}"
                    s.add(TaskEvent(task=t, kind="error", message=t.error))
                    kind = t.kind
                if kind is not None:
                    failed_kinds.append(kind)
        return me.epoch, work, failed_kinds

    def _take_over_one(
        self, s: Session, t: Task, restarted: bool, before: str | None, work: list[Resumption]
    ) -> str | None:
        """One claimed task: its resumption added to ``work``, or it ends (its kind
        returned: what the caller's hooks may have to finish)."""
        me = self.membership
        how = (
            "manager restarted: resuming"
            if restarted
            else f"taken over by replica {me.name} from {before} (its lease expired): resuming"
        )
        if t.state == TaskState.RUNNING and t.machine:
            go = self._disk_task_resumer(s, t)
            if go is None and t.kind == "migrate":
                go = self._migration_resumer(t)
            if go is not None:
                work.append((t.id, t.cancel_requested, go))
                s.add(TaskEvent(task=t, kind="note", message=how))
                return None
        who = "the manager restarted" if restarted else f"its manager ({before}) stopped"
        t.state, t.ended_at = TaskState.FAILED, utcnow()
        t.error = (
            f"{who} during this operation: the migrations it had "
            "started go on by themselves; run it again for the rest"
            if t.kind in OPERATION_KINDS
            else f"{who} before this task began; nothing was changed"
        )
        s.add(TaskEvent(task=t, kind="error", message=t.error))
        return t.kind

    def _cancels_asked(self) -> list[int]:
        """This replica's tasks whose cancel was asked through another replica's API."""
        mine = list(self._cancel)
        if not mine:
            return []
        with self.db.session() as s:
            return list(s.scalars(select(Task.id).where(Task.id.in_(mine), Task.cancel_requested)))

    def _start(self, claimed: Claimed) -> None:
        """In the loop: the claimed tasks' work, then what the ended ones leave to do. A
        claim made under an epoch this replica has since left is dropped: those tasks are
        orphans of that epoch now, for the next round."""
        epoch, work, ended = claimed
        if epoch != self.membership.epoch or self.membership.lost:
            return
        for task_id, cancelled, go in work:
            cancel = self._cancel[task_id] = asyncio.Event()
            if cancelled:
                cancel.set()
            self._launch(task_id, go())
        for hook in self.after_takeover if ended else ():
            try:
                hook(ended)
            except Exception:  # the claimed tasks run whatever a hook does
                log.exception("a takeover hook failed")

    def _launch(self, task_id: int, work: Coroutine[Any, Any, None]) -> None:
        """The task's coroutine, which carries the epoch it runs under: a write of it is
        refused once the replica has joined again (its claim-back runs under the new one)."""
        ctx = contextvars.copy_context()
        ctx.run(RUN_EPOCH.set, self.membership.epoch)
        self._running[task_id] = asyncio.create_task(work, name=f"task-{task_id}", context=ctx)

    async def settle(self, finish: Callable[..., None], *args: Any) -> None:
        """A task's end written, however long the database takes: an end not written would
        leave the task running in the database with no run and no replica to claim it (its
        owner lives). Raises LeaseLost (another replica owns it now)."""
        errors = 0
        while True:
            try:
                await asyncio.to_thread(finish, *args)
                return
            except LeaseLost:
                raise
            except Exception:
                errors += 1
                log.exception("a task's end could not be written (again in a moment)")
                await asyncio.sleep(min(30.0, 0.5 * 2**errors))

    def _forget(self, task_id: int) -> None:
        """A run ended: its entries go, unless a later run of the same task replaced them."""
        if self._running.get(task_id) is asyncio.current_task():
            self._running.pop(task_id, None)
            self._cancel.pop(task_id, None)

    def owned_task(self, s: Session, task_id: int) -> Task:
        """The task's row, locked, while this replica still owns it. Otherwise another
        replica took it over: this one's work on it is cancelled (as at a shutdown: nothing
        more is done on the hosts) and the write is refused."""
        me = self.membership
        epoch = RUN_EPOCH.get(me.epoch)  # the run's own epoch (outside a run: the current)
        me.bound_locks(s)
        # A write first, not a read: it takes the row's lock (PostgreSQL) or the database's
        # write lock (SQLite, whose driver would run a read outside the transaction), so no
        # takeover slips in between this check and the step's write.
        held = s.execute(
            update(Task)
            .where(
                Task.id == task_id,
                Task.owner == me.name,
                Task.owner_epoch == epoch,
                Task.state.in_(ACTIVE_TASK_STATES),
            )
            .values(owner_epoch=epoch)
            .execution_options(synchronize_session=False)
        )
        t = s.get(Task, task_id, populate_existing=True)
        assert t is not None
        if not held.rowcount or epoch != me.epoch:  # type: ignore[attr-defined]
            self._abandon_soon(task_id)
            raise LeaseLost(task_id, t.owner)
        return t

    def _abandon_soon(self, task_id: int) -> None:
        """From a worker thread or the loop: the task's coroutine (the one running now, not
        one started later for the same task after a claim back) is cancelled."""
        if self._loop is None or self._loop.is_closed():
            return
        doomed = self._running.get(task_id)

        def cancel() -> None:
            if doomed is not None and self._running.get(task_id) is doomed:
                doomed.cancel()

        self._loop.call_soon_threadsafe(cancel)

    async def abandon_all(self) -> None:
        """Stop every task's work here without ending it (it is left as persisted)."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _mark_running(self, task_id: int, hosts: Sequence[str]) -> bool:
        """Running, if the hosts have a free slot cluster-wide: the slots held here count
        this replica's moves only, and other replicas' run on the same hosts. In PostgreSQL
        the hosts' rows are locked for the count, so two replicas never both take a host's
        last slot. False: no room yet (nothing written)."""
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            if self.db.postgresql:
                # In one order (no two moves lock each other's hosts the other way round).
                s.execute(
                    select(Host.id).where(Host.name.in_(hosts)).order_by(Host.id).with_for_update()
                )
            for host in set(hosts):
                busy = s.scalar(
                    select(func.count(Task.id)).where(
                        Task.state == TaskState.RUNNING,
                        Task.kind.not_in(OPERATION_KINDS),
                        Task.id != task_id,
                        or_(Task.source == host, Task.destination == host),
                    )
                )
                if (busy or 0) >= self.per_host:
                    return False
            t.state, t.started_at = TaskState.RUNNING, utcnow()
            s.add(TaskEvent(task=t, kind="started", message="started"))
            return True

    async def _begin(self, task_id: int, hosts: Sequence[str], cancel: asyncio.Event) -> bool:
        """Mark the task running once the cluster has room on its hosts; False: cancelled
        while waiting for it."""
        while not await asyncio.to_thread(self._mark_running, task_id, hosts):
            if cancel.is_set():
                return False
            await asyncio.sleep(CLUSTER_SLOT_POLL_S)
        return True
