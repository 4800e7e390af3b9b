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
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qmotion.server.db import ACTIVE_TASK_STATES, Database, Lease, Replica, Task, utcnow

log = logging.getLogger(__name__)
DEFAULT_LEASE_S = 10.0
LEADER = "leader"
# Past this part of the lease without a renewal, a replica stops its own work.
SELF_FENCE = 0.8
# The name of a replica when only one runs (the default): a restart is a new epoch of it.
DEFAULT_NAME = "local"


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
    leader_token: int | None = None
    renewed: float = field(default=0.0)
    led: float = field(default=0.0)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_s)

    def join(self) -> int:
        """A new epoch under this name: whatever a previous process of it owned is orphaned."""
        now = self.clock()
        for _ in range(3):
            try:
                with self.db.session() as s:
                    row = s.get(Replica, self.name, with_for_update=True)
                    if row is None:
                        row = Replica(name=self.name, epoch=1, started_at=now)
                        s.add(row)
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
                self.renewed = self.monotonic()
                log.info("replica %s joined (epoch %d)", self.name, self.epoch)
                return self.epoch
            except IntegrityError:  # another process of the same name inserted it first
                continue
        raise RuntimeError(f"replica {self.name}: could not join")

    def renew(self) -> bool:
        """False: another process took this name (a newer epoch); this one must stop."""
        now = self.clock()
        with self.db.session() as s:
            done = s.execute(
                update(Replica)
                .where(Replica.name == self.name, Replica.epoch == self.epoch)
                .values(renewed_at=now, expires_at=now + self.lease)
                .execution_options(synchronize_session=False)
            )
            ok = bool(done.rowcount)  # type: ignore[attr-defined]
        if ok:
            self.renewed = self.monotonic()
        return ok

    def fenced(self) -> bool:
        """Too long without a renewal: the lease may be expiring; stop acting."""
        return self.monotonic() - self.renewed > self.lease_s * SELF_FENCE

    def leave(self) -> None:
        """A clean stop: the lease ends now, so another replica takes over at once."""
        now = self.clock()
        with self.db.session() as s:
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
        now = self.clock()
        try:
            with self.db.session() as s:
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
            self.led = self.monotonic()
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
        query = (
            select(Task)
            .where(Task.state.in_(ACTIVE_TASK_STATES), ~live)
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
                await asyncio.to_thread(membership.lead)
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
