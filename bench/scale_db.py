"""The scale bench's databases: a throwaway PostgreSQL per backend, emptied per row, sized."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import MetaData, create_engine, text

from qmotion.lab.errors import LabSetupError
from qmotion.lab.postgres import throwaway_postgres
from qmotion.server.db import Base


def db_bytes(url: str) -> int:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return int(c.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    finally:
        engine.dispose()


def reset(url: str) -> None:
    """A given database starts each row empty: the manager's tables (and the schema's
    revision, or the next manager would take the empty database for an upgraded one) go."""
    engine = create_engine(url)
    found = MetaData()
    found.reflect(engine)
    ours = {*Base.metadata.tables, "alembic_version"}
    found.drop_all(engine, tables=[t for t in found.sorted_tables if t.name in ours])
    engine.dispose()


@contextlib.contextmanager
def database(backend: str, given: str | None) -> Iterator[str | None]:
    """The backend's database for its rows: the given one; None for SQLite (each row makes
    its own file); else a throwaway PostgreSQL, fsync on (``durable``: a production server's
    commits cost that too), stopped and removed however the block ends. Its server runs as
    its own user and reaches its directory through the one made here: hence 0o711."""
    if given or backend != "postgresql":
        yield given
        return
    base = Path(tempfile.mkdtemp(prefix="qmotion-bench-pg-"))
    try:
        base.chmod(0o711)
        with throwaway_postgres(base / "pg", durable=True) as url:
            yield url
    except LabSetupError as exc:
        sys.exit(f"scale: no PostgreSQL ({exc}); or give one: --db-url postgresql+psycopg://…")
    finally:
        shutil.rmtree(base, ignore_errors=True)
