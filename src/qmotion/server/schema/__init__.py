"""The manager's schema under Alembic: brought to the code's revision, from empty or from a
database made before Alembic (release bd57676 and earlier), one process at a time.

It imports SQLAlchemy, Alembic and qmotion.locks only: the models' metadata comes from the
caller (server/db), whose module imports this one. Its revisions are in ``versions/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import OperationalError

from qmotion.locks import file_lock

BASELINE = "0001"
# The tables the baseline revision makes: a database from before Alembic gets the missing
# ones made from the models, which for these tables have not changed since.
BASELINE_TABLES = (
    "api_tokens", "audit", "host_maintenance", "hosts", "images", "join_tokens",
    "recommendations", "rules", "schedule_runs", "schedules", "settings", "task_events",
    "tasks", "users", "vms",
)  # fmt: skip
# Columns added before Alembic (table, column): a database older than them lacks them.
LEGACY_ADDED_COLUMNS = (("vms", "attention"), ("hosts", "approved"), ("join_tokens", "migration"))
# Any constant both replicas agree on: the upgrade's lock in PostgreSQL.
PG_LOCK_KEY = 0x716D6F74  # "qmot"


class SchemaBehind(Exception):
    """The database is older than this code and may not be upgraded here."""


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, url: str, metadata: MetaData) -> None:
    """To the head revision; concurrent starts on one database take turns. ``metadata``:
    the models' tables (db.Base's), which a database from before Alembic is completed from."""
    with _exclusive(engine, url) as conn:
        if current(conn) == head():
            return
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and tables & set(BASELINE_TABLES):
            _legacy_to_baseline(conn, metadata)
            _stamp(conn, BASELINE)
        cfg = config()
        cfg.attributes["connection"], cfg.attributes["metadata"] = conn, metadata
        command.upgrade(cfg, "head")
        conn.commit()


def check_current(engine: Engine) -> None:
    with engine.connect() as conn:
        rev = current(conn)
    if rev != head():
        raise SchemaBehind(
            f"the database is at revision {rev or 'none'}, this code needs {head()}: "
            "run `qmotion server db upgrade`"
        )


@contextlib.contextmanager
def _exclusive(engine: Engine, url: str) -> Iterator[Connection]:
    """PostgreSQL: a session advisory lock (held by this connection; a crashed upgrader's ends
    with its session). SQLite: a lock file beside the database (one machine)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                conn.commit()
            return
        name = url.removeprefix("sqlite:///").split("?", 1)[0]
        if not url.startswith("sqlite:///") or not name or name == ":memory:":
            yield conn
            return
        with file_lock(Path(name + ".upgrade-lock")):
            yield conn


def _stamp(conn: Connection, rev: str) -> None:
    cfg = config()
    cfg.attributes["connection"] = conn
    command.stamp(cfg, rev)


def _legacy_to_baseline(conn: Connection, metadata: MetaData) -> None:
    """What the manager did at start before Alembic: missing tables, the active-task index,
    and the columns added later; the database then matches the baseline revision."""
    metadata.create_all(conn, tables=[metadata.tables[t] for t in BASELINE_TABLES])
    for index in metadata.tables["tasks"].indexes:
        if index.name == "uq_tasks_active_vm":
            index.create(conn, checkfirst=True)
    for table, column in LEGACY_ADDED_COLUMNS:
        if column in {c["name"] for c in inspect(conn).get_columns(table)}:
            continue
        kind = metadata.tables[table].c[column].type.compile(dialect=conn.dialect)
        try:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
        except OperationalError:
            if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
                raise
