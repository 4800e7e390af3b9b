"""The manager's inventory and tasks in SQLAlchemy: SQLite by default, PostgreSQL to scale.

The schema is under Alembic (``server/schema``): a database is brought to the code's revision
when the manager starts (``qmotion server db upgrade`` does it alone).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from qmotion.server import schema


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend: SQLite stores no zone and hands back naive
    values, which the API's schema (``date-time`` with an offset) does not allow."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    agent_url: Mapped[str] = mapped_column(String(256))
    token: Mapped[str] = mapped_column(String(256))
    # Up to "entering-maintenance" (20): SQLite never enforced the 16 it had.
    state: Mapped[str] = mapped_column(String(32), default="up")
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # The addresses an admin approved for its certificate (a joined host: the join token's);
    # None: a host registered by hand, certified for the addresses it reports.
    approved: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    vms: Mapped[list[Vm]] = relationship(back_populates="host")


class Vm(Base):
    __tablename__ = "vms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    address: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    host: Mapped[Host] = relationship(back_populates="vms")
    state: Mapped[str] = mapped_column(String(16), default="stopped")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    memory_mib: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # Why the VM needs an operator (set by reconcile or a migration); None: nothing to do.
    attention: Mapped[str | None] = mapped_column(Text, nullable=True)


class Image(Base):
    """A disk image in the library: a file on a datastore that VM disks are copied from."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    datastore: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    format: Mapped[str] = mapped_column(String(8))
    virtual_size: Mapped[int] = mapped_column(BigInteger)
    allocated_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class PlacementRule(Base):
    """A DRS rule: affinity, anti-affinity (VM-VM), run-on, not-run-on (VM-host)."""

    __tablename__ = "rules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    strength: Mapped[str] = mapped_column(String(8))
    vms: Mapped[list[str]] = mapped_column(JSON)
    hosts: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Recommendation(Base):
    """One move of a DRS run, and what became of it."""

    __tablename__ = "recommendations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(Integer, index=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    gain: Mapped[float] = mapped_column(Float)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    task_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    applied_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class HostMaintenance(Base):
    """A host's maintenance: the task evacuating it, why it is stuck, where its VMs went."""

    __tablename__ = "host_maintenance"
    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # VM name -> the host it was evacuated to (for ``exit --return``).
    evacuated: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)


class Setting(Base):
    """Cluster-wide settings (address pool, CPU baseline), as JSON values."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    vm: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    destination: Mapped[str | None] = mapped_column(String(64), nullable=True)
    phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    machine: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The manager replica running it, and that replica's epoch when it took the task: a
    # replica writes a step only while both still match (its fencing token, see replicas).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    owner_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    events: Mapped[list[TaskEvent]] = relationship(
        back_populates="task", order_by="TaskEvent.id", cascade="all, delete-orphan"
    )

    # At most one active task per VM, enforced by the database: two concurrent submissions
    # cannot both pass a read-then-insert check, whatever the isolation level.
    __table_args__ = (
        Index(
            "uq_tasks_active_vm",
            "vm",
            unique=True,
            sqlite_where=text("state IN ('queued', 'running')"),
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
    )


class TaskEvent(Base):
    __tablename__ = "task_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    task: Mapped[Task] = relationship(back_populates="events")
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class User(Base):
    """Someone (or something) calling the manager's API, with a role (api.access.Role)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class ApiToken(Base):
    """A user's API token: only its SHA-256 is kept (it is only ever compared)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class JoinToken(Base):
    """A one-time token a new host joins with (``host add``); only its SHA-256 is kept."""

    __tablename__ = "join_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    host: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    migration: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class AuditRecord(Base):
    """One state-changing call to the manager's API: who, what, when, and how it ended."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    route: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    task_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Replica(Base):
    """A manager process serving the cluster's database: its lease on the tasks it owns.

    ``epoch`` grows each time a process starts under the name: the previous process's tasks,
    stamped with the older epoch, are then orphans a live replica takes over."""

    __tablename__ = "replicas"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    address: Mapped[str | None] = mapped_column(String(256), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    renewed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Lease(Base):
    """A named lease (the leader's): who holds it until when, and a fencing token that grows
    with every change of holder."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    holder_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Schedule(Base):
    """A one-off (at) or recurring (cron) action; next_run_at None: finished."""

    __tablename__ = "schedules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    cron: Mapped[str | None] = mapped_column(String(256), nullable=True)
    action: Mapped[str] = mapped_column(String(32))
    vm: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # "to" is an SQL keyword; the column is named for what it holds.
    to: Mapped[str | None] = mapped_column("to_host", String(64), nullable=True)
    host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    grace_s: Mapped[int] = mapped_column(Integer)
    next_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class ScheduleRun(Base):
    """One run of a schedule: the task it started, why it failed, or that it was missed."""

    __tablename__ = "schedule_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    ran_at: Mapped[datetime] = mapped_column(UtcDateTime())
    outcome: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text)


class ConsoleSessionRow(Base):
    """A web console session: the digest of its cookie's secret, of the API token it stands
    for, its CSRF token; times in wall-clock seconds."""

    __tablename__ = "console_sessions"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_digest: Mapped[str] = mapped_column(String(64))
    csrf: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)


ACTIVE_TASK_STATES = ("queued", "running")


def _private_sqlite_file(url: str) -> None:
    """The database holds every host's agent credentials and every user's token digest: only
    its owner may read it. SQLite gives its -wal and -shm files the database file's mode."""
    if not url.startswith("sqlite:///"):
        return
    name = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not name or name == ":memory:":
        return
    path = Path(name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


# PostgreSQL: a call fails within seconds when the server or the network does (a replica
# must notice before its lease ends), and a dead pooled connection is replaced, not handed
# to a task step.
PG_CONNECT: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "options": "-c statement_timeout=60000",
}


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql", "postgres"))


def engine_options(url: str, pool_size: int = 10, max_overflow: int = 64) -> dict[str, Any]:
    """PostgreSQL: as many connections as the manager's worker threads (64) and its event
    loop may hold at once, so no step waits for one."""
    if is_postgresql(url):
        return {
            "connect_args": PG_CONNECT,
            "pool_pre_ping": True,
            "pool_size": pool_size,
            "max_overflow": max_overflow,
            "pool_timeout": 30,
        }
    if url.startswith("sqlite"):
        # A file: one connection per worker thread as well (SQLite serialises the writes).
        # A writer waits its turn up to 30 s: the driver's 5 s failed a burst of submissions
        # with "database is locked" (200 at once in the scale bench).
        return {
            "connect_args": {"check_same_thread": False, "timeout": 30.0},
            **(
                {}
                if ":memory:" in url or url == "sqlite://"
                else _file_pool(pool_size, max_overflow)
            ),
        }
    return {}


def _wal(cur: Any, wait_s: float = 30.0) -> None:
    """WAL mode, which the file keeps once set. Switching needs the file to itself, and SQLite
    answers "database is locked" at once (no busy wait) while another connection has it open,
    as when replicas start together on a new file: asked again until one switch took."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _file_pool(pool_size: int, max_overflow: int) -> dict[str, Any]:
    return {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": 30}


class Database:
    """``upgrade``: bring the schema to the code's revision first (the manager at start);
    False: refuse a database that is behind (a tool that must not change it)."""

    def __init__(self, url: str, upgrade: bool = True) -> None:
        self.url = url
        self.postgresql = is_postgresql(url)
        _private_sqlite_file(url)
        self.engine: Engine = create_engine(url, **engine_options(url))
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                cur = conn.cursor()
                # WAL: readers (API) do not block the writer (task runner).
                _wal(cur)
                # With WAL, NORMAL stays consistent after a crash and saves an fsync per
                # commit: every task step is a commit, and they sit on the migration's path.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        if upgrade:
            schema.upgrade(self.engine, url, Base.metadata)
        else:
            schema.check_current(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def setting(self, key: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return dict(row.value) if row else None

    def set_setting(self, key: str, value: dict[str, Any]) -> None:
        with self.session() as s:
            row = s.get(Setting, key)
            if row is None:
                s.add(Setting(key=key, value=value))
            else:
                row.value = json.loads(json.dumps(value))

    def active_task_for_vm(self, s: Session, vm: str) -> Task | None:
        return s.scalars(
            select(Task).where(Task.vm == vm, Task.state.in_(ACTIVE_TASK_STATES))
        ).first()
