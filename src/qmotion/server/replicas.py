"""Manager replicas on one database: each one's lease, the leader's lease, orphaned tasks.

Leases are rows, renewed by compare-and-set (``UPDATE ... WHERE holder = me``), not
PostgreSQL advisory locks: an advisory lock lives in one database session, so a connection
pool, a PgBouncer or a database failover would drop or move it silently, and SQLite has none.
A row works the same on both backends and reads back (``replicas``, ``leases``) for an
operator.

- Every replica holds a lease on itself (``replicas``): renewed every third of the lease,
  stamped with an epoch that grows at each start under the name. A task row names its owner
  and the owner's epoch: that pair is the task's fencing token. A replica writes a task's
  step only in a transaction that locks the row and finds the pair still its own, so once
  another replica took the task over, the old owner's next write fails and its work on the
  task stops before it calls an agent again.
- A task whose owner's lease expired (or whose epoch is older: the process restarted) is an
  orphan; any live replica claims orphans (``FOR UPDATE SKIP LOCKED`` in PostgreSQL, so two
  never claim one) and resumes them from their persisted state, as after a restart.
- The cluster-wide background work (host refresh and reconcile, DRS rounds, schedules) runs
  on the holder of the ``leader`` lease only; its token grows with every change of holder.
- A replica that could not renew within ``SELF_FENCE`` of its lease stops its own work first
  (the lease would otherwise expire while it still acts). Replicas' clocks must agree within
  a small part of the lease (NTP); the lease is 10 s by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, create_engine, exists, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qmotion.server.db import (
    ACTIVE_TASK_STATES,
    Database,
    Lease,
    Replica,
    Task,
    engine_options,
    utcnow,
)
from qmotion.server.errors import NameTaken

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_LEASE_S = 10.0
LEADER = "leader"
# Past this part of the lease without a renewal, a replica stops its own work.
SELF_FENCE = 0.8
# The name of a replica when only one runs (the default): a restart is a new epoch of it.
DEFAULT_NAME = "local"
# Leases an exclusive replica waits for its name's live lease to end before it refuses.
EXCLUSIVE_WAIT = 3
# The shortest idle time a lock-holding transaction is allowed (see Membership.bound_locks).
IDLE_LOCK_FLOOR_S = 2.0


@dataclass
class Membership:
    """This process's place among the replicas: its name, epoch and leases."""

    db: Database
    name: str = DEFAULT_NAME
    lease_s: float = DEFAULT_LEASE_S
    address: str | None = None
    clock: Callable[[], datetime] = utcnow
    monotonic: Callable[[], float] = time.monotonic
    epoch: int = 0  # 0: not joined yet (tasks made then are taken over by the first join)
    exclusive: bool = False  # a real server: never take a name whose lease is live
    lost: bool = False  # a renewal found the lease ended or the name taken
    leader_token: int | None = None
    renewed: float = field(default=0.0)
    led: float = field(default=0.0)

    def __post_init__(self) -> None:
        # PostgreSQL: leases on connections of their own, so a pool busy with task steps
        # and agent calls does not delay a renewal past the lease.
        self._engine = (
            create_engine(self.db.url, **engine_options(self.db.url, pool_size=2, max_overflow=0))
            if self.db.postgresql
            else self.db.engine
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"lease-{self.name}")
        self._turn = threading.Lock()  # renewals and rejoins, one at a time

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            self.bound_locks(s)
            yield s

    def bound_locks(self, s: Session) -> None:
        """PostgreSQL: this transaction ends if it idles longer than a lease. Its row locks
        (a task's, a lease's) would otherwise outlive a replica frozen inside it (SIGSTOP, a
        stalled VM): keepalives do not see a frozen process, whose kernel still answers, and
        the others' claims skip a locked task row. SQL only runs inside these transactions,
        so a live replica's idle gaps are far shorter; one idle past its lease is fenced
        anyway."""
        if s.get_bind().dialect.name == "postgresql":
            ms = max(IDLE_LOCK_FLOOR_S, self.lease_s) * 1000
            s.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {int(ms)}"))

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_s)

    def join(self) -> int:
        """A new epoch under this name: whatever a previous process of it owned is orphaned.

        With ``exclusive`` (a real server), a name whose lease is live may belong to a
        running process (a second start by mistake) or to one killed a moment ago: a
        running one renews within a third of a lease, so the name is taken once no renewal
        came for that long (plus a second), and refused if one did, after EXCLUSIVE_WAIT
        leases of waiting for it to end."""
        deadline = self.monotonic() + self.lease_s * EXCLUSIVE_WAIT
        quiet = self.lease_s / 3 + 1.0
        seen: datetime | None = None
        since = self.monotonic()
        while True:
            dead = seen is not None and self.monotonic() - since >= quiet
            began = self.monotonic()
            epoch, renewed_at = self._try_join(take_live=dead)
            if epoch is not None:
                self.renewed = began
                log.info("replica %s joined (epoch %d)", self.name, epoch)
                return epoch
            if renewed_at != seen:  # a renewal: the holder lives (or this is the first look)
                if seen is not None and self.monotonic() > deadline:
                    raise NameTaken(
                        f"replica name {self.name}: another manager process holds it (it "
                        "renews its lease); give this one another --replica name"
                    )
                if seen is not None:
                    log.warning("replica %s: another process renews this name", self.name)
                seen, since = renewed_at, self.monotonic()
            time.sleep(min(0.5, self.lease_s / 8))

    def _try_join(self, take_live: bool) -> tuple[int | None, datetime | None]:
        """(the new epoch, None), or (None, the live holder's last renewal)."""
        now = self.clock()
        for _ in range(3):
            try:
                with self._session() as s:
                    row = s.get(Replica, self.name, with_for_update=True)
                    if row is None:
                        row = Replica(name=self.name, epoch=1, started_at=now)
                        s.add(row)
                    elif self.exclusive and row.expires_at > now and not take_live:
                        return None, row.renewed_at
                    else:
                        row.epoch += 1
                        row.started_at = now
                    row.address, row.renewed_at, row.expires_at = (
                        self.address,
                        now,
                        now + self.lease,
                    )
                    s.flush()
                    self.epoch = row.epoch
                return self.epoch, None
            except IntegrityError:  # another process of the same name inserted it first
                continue
        raise RuntimeError(f"replica {self.name}: could not join")

    def rejoin(self) -> int:
        """After this process lost its lease: a new epoch at once (the live lease, if any,
        is this process's own older epoch)."""
        with self._turn:
            with self._session() as s:
                row = s.get(Replica, self.name)
                newer = (
                    row is not None and row.epoch != self.epoch and row.expires_at > self.clock()
                )
            if newer:
                # Another process took the name (a replacement started while this one was
                # frozen): taking it back would fence that one in turn, back and forth.
                raise NameTaken(
                    f"replica name {self.name}: another manager process holds it now; this "
                    "one stays out of the cluster (restart it with another --replica name)"
                )
            exclusive, self.exclusive = self.exclusive, False
            try:
                epoch = self.join()
            finally:
                self.exclusive = exclusive
            self.lost = False
        return epoch

    def heartbeat(self, stop: threading.Event, tripped: Callable[[], None]) -> None:
        """The renewals, every third of a lease, on the calling thread until ``stop``. Once
        a renewal finds the lease ended or the name taken, ``lost`` is set, ``tripped`` is
        called, and renewals pause until ``rejoin``."""
        while not stop.wait(self.lease_s / 3):
            with self._turn:  # not across a rejoin: a renewal of the old epoch would fail
                if stop.is_set():
                    return  # the replica leaves: no renewal after its lease was ended
                if self.lost:
                    continue
                began = self.monotonic()
                try:
                    renewed = self.renew()
                except Exception:
                    log.exception("replica %s: could not renew its lease", self.name)
                    continue  # the database may be back before the lease ends
                took = self.monotonic() - began
                if took > self.lease_s / 10:
                    log.warning("replica %s: a renewal took %.1f s", self.name, took)
                if not renewed:
                    self.lost = True
            if self.lost and not stop.is_set():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    tripped()

    async def call(self, fn: Callable[[], T]) -> T:
        """Lease work on a thread of its own: a worker pool busy with agent calls must not
        hold a renewal past the lease."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def renew(self) -> bool:
        """False: the lease ended (this process stalled past it) or another process took
        the name (a newer epoch): this one must stop its work and join again."""
        # Taken before the clock the expiry is computed from: the self-fence point counts
        # from no later than the lease's real start, however long the write then takes.
        began = self.monotonic()
        now = self.clock()
        with self._session() as s:
            done = s.execute(
                update(Replica)
                .where(
                    Replica.name == self.name,
                    Replica.epoch == self.epoch,
                    Replica.expires_at > now,
                )
                .values(renewed_at=now, expires_at=now + self.lease)
                .execution_options(synchronize_session=False)
            )
            ok = bool(done.rowcount)  # type: ignore[attr-defined]
        if ok:
            self.renewed = began
        return ok

    def fenced(self) -> bool:
        """Too long without a renewal: the lease may be expiring; stop acting."""
        return self.monotonic() - self.renewed > self.lease_s * SELF_FENCE

    def leave(self) -> None:
        """A clean stop: the lease ends now, so another replica takes over at once."""
        with self._turn:  # not while a renewal would push the expiry out again
            self._leave()
        if self._engine is not self.db.engine:
            self._engine.dispose()
        self._pool.shutdown(wait=False)

    def _leave(self) -> None:
        now = self.clock()
        with self._session() as s:
            s.execute(
                update(Replica)
                .where(Replica.name == self.name, Replica.epoch == self.epoch)
                .values(expires_at=now)
                .execution_options(synchronize_session=False)
            )
            s.execute(
                update(Lease)
                .where(Lease.holder == self.name, Lease.holder_epoch == self.epoch)
                .values(expires_at=now)
                .execution_options(synchronize_session=False)
            )
        self.leader_token = None

    # ------------------------------------------------------------------ leadership

    def lead(self) -> int | None:
        """Take or keep the leader lease; its fencing token, or None (another leads)."""
        began = self.monotonic()
        now = self.clock()
        try:
            with self._session() as s:
                row = s.get(Lease, LEADER, with_for_update=True)
                if row is None:
                    row = Lease(name=LEADER, token=0, expires_at=now)
                    s.add(row)
                mine = row.holder == self.name and row.holder_epoch == self.epoch
                if not mine and row.expires_at > now:
                    token = None
                else:
                    if not mine:
                        row.token += 1
                        row.holder, row.holder_epoch = self.name, self.epoch
                    row.expires_at = now + self.lease
                    token = row.token
        except IntegrityError:  # two first replicas inserted the row at once: the other won
            token = None
        if token is not None and token != self.leader_token:
            log.info("replica %s leads (token %d)", self.name, token)
        self.leader_token = token
        if token is not None:
            self.led = began
        return token

    def leading(self) -> bool:
        return self.leader_token is not None and (
            self.monotonic() - self.led <= self.lease_s * SELF_FENCE
        )

    # ------------------------------------------------------------------ tasks

    def holds(self, t: Task) -> bool:
        return t.owner == self.name and t.owner_epoch == self.epoch

    def stamp(self, t: Task) -> None:
        t.owner, t.owner_epoch = self.name, self.epoch

    def orphans(self, s: Session, limit: int = 100) -> list[Task]:
        """Active tasks no live replica holds, locked for this session; another replica's
        claim in progress is skipped, not waited for."""
        live = exists().where(
            and_(
                Replica.name == Task.owner,
                Replica.epoch == Task.owner_epoch,
                Replica.expires_at > self.clock(),
            )
        )
        # Never this process's own (its lease may read as ended to it after a stall: then
        # it stops them and joins again, and they are orphans of its old epoch).
        # NULL-safe: "owner = me" is NULL, not false, for a task with no owner, and the NOT
        # of it would drop that task too (a database from before replicas has them).
        mine = and_(
            Task.owner.is_not_distinct_from(self.name),
            Task.owner_epoch.is_not_distinct_from(self.epoch),
        )
        query = (
            select(Task)
            .where(Task.state.in_(ACTIVE_TASK_STATES), ~live, ~mine)
            .order_by(Task.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=Task)
        )
        return list(s.scalars(query))


def replica_list(db: Database) -> list[Replica]:
    with db.session() as s:
        return list(s.scalars(select(Replica).order_by(Replica.name)))


async def while_leading(
    membership: Membership, loops: Callable[[], list[Coroutine[Any, Any, None]]]
) -> None:
    """Run the cluster-wide ``loops`` while this replica holds the leader lease: started
    when it takes the lease, cancelled when it loses it or cannot renew it in time."""
    running: list[asyncio.Task[None]] = []

    async def stop() -> None:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        running.clear()

    try:
        while True:
            try:
                await membership.call(membership.lead)
            except Exception:
                log.exception("replica %s: could not renew the leader lease", membership.name)
            if membership.leading() and not running:
                running.extend(asyncio.ensure_future(c) for c in loops())
            elif not membership.leading() and running:
                log.warning("replica %s no longer leads: background work stops", membership.name)
                await stop()
            await asyncio.sleep(membership.lease_s / 3)
    finally:
        await stop()


def leader(db: Database) -> tuple[str, int] | None:
    """Who holds the leader lease now (name, epoch); None: nobody."""
    with db.session() as s:
        row = s.get(Lease, LEADER)
        if row is None or row.holder is None or row.expires_at <= utcnow():
            return None
        return row.holder, row.holder_epoch or 0
