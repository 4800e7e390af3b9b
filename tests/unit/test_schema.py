"""The schema under Alembic: a database written by the last release before it (bd57676)
upgrades with every row kept; a fresh one, on both backends; replicas starting together."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from qmotion.cli.main import app
from qmotion.server import schema
from qmotion.server.db import Database, Host, Task
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner
from tests.conftest import repo_root

RELEASE_DB = repo_root() / "tests" / "data" / "release-bd57676.db"


def _rows(path: Path) -> dict[str, set[tuple[object, ...]]]:
    """Every table's rows, as the release wrote them (its columns only)."""
    con = sqlite3.connect(path)
    try:
        tables = [
            t
            for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if t != "alembic_version"
        ]
        return {t: set(con.execute(f"SELECT * FROM {t}")) for t in tables}
    finally:
        con.close()


def _release_copy(tmp_path: Path) -> Path:
    path = tmp_path / "manager.db"
    shutil.copy(RELEASE_DB, path)
    return path


def test_the_release_database_upgrades_keeping_every_row(tmp_path: Path) -> None:
    path = _release_copy(tmp_path)
    before = _rows(path)
    assert sum(map(len, before.values())) >= 20 and all(before.values()), before
    db = Database(f"sqlite:///{path}")
    with db.engine.connect() as conn:
        assert schema.current(conn) == schema.head()
        tasks = {c["name"] for c in inspect(conn).get_columns("tasks")}
    assert {"owner", "owner_epoch"} <= tasks
    after = _rows(path)
    for table, rows in before.items():
        width = len(next(iter(rows)))
        assert {r[:width] for r in after[table]} == rows, table
    # The manager runs on it: its VMs listed, and the task the release left running (no
    # machine state yet: it had not begun) ends as after a restart, nothing changed.
    assert sorted(v.name for v in Inventory(db).list_vms()) == [f"vm{i}" for i in range(6)]
    runner = TaskRunner(db, Inventory(db))
    _, work, ended = runner._claim_orphans()
    assert work == [] and ended == ["migrate"]
    with db.session() as s:
        left = s.query(Task).filter_by(vm="vm3").one()
        assert left.state == "failed" and left.owner == "local"
        assert "nothing was changed" in (left.error or "")
    db.engine.dispose()
    # A second start finds it current and changes nothing.
    again = _rows(path)
    Database(f"sqlite:///{path}").engine.dispose()
    assert _rows(path) == again


def test_a_database_behind_is_refused_when_it_may_not_be_upgraded(tmp_path: Path) -> None:
    path = _release_copy(tmp_path)
    with pytest.raises(schema.SchemaBehind, match="qmotion server db upgrade"):
        Database(f"sqlite:///{path}", upgrade=False)
    assert _rows(path) == _rows(RELEASE_DB)  # untouched


def test_the_cli_upgrades_and_reports(tmp_path: Path) -> None:
    path = _release_copy(tmp_path)
    url = f"sqlite:///{path}"
    out = CliRunner().invoke(app, ["server", "db", "status", "--db", url])
    assert out.exit_code == 1 and "schema: empty" in out.output, out.output
    out = CliRunner().invoke(app, ["server", "db", "upgrade", "--db", url])
    assert out.exit_code == 0, out.output
    assert f"database at revision {schema.head()} (was empty)" in out.output
    out = CliRunner().invoke(app, ["server", "db", "status", "--db", url])
    assert out.exit_code == 0 and f"schema: {schema.head()}" in out.output, out.output


def test_a_fresh_database_on_either_backend_and_concurrent_starts(db_url: str) -> None:
    """Four replicas starting at once on an empty database: one upgrades, the others wait
    for it and find it current; the long host states fit (PostgreSQL enforces lengths)."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Database(db_url).engine.dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an upgrade hung"
    assert errors == []
    db = Database(db_url)
    with db.session() as s:
        s.add(Host(name="h1", agent_url="http://x", token="t", state="entering-maintenance"))
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert schema.current(conn) == schema.head()
    db.engine.dispose()


def test_an_upgrade_from_the_baseline_keeps_rows_on_postgresql(
    db_url: str,
) -> None:
    """The same path a PostgreSQL made by the baseline takes: rows in, upgraded, rows kept."""
    engine = create_engine(db_url)
    cfg = schema.config()
    from alembic import command

    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, schema.BASELINE)
        conn.execute(
            text(
                "INSERT INTO hosts (id, name, agent_url, token, state, registered_at) "
                "VALUES (1, 'h1', 'http://h1', 'tok', 'up', '2026-12-07 12:00:00+00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO tasks (id, kind, state, progress, cancel_requested, created_at) "
                "VALUES (7, 'migrate', 'succeeded', 1.0, false, '2026-12-07 12:00:00+00:00')"
            )
        )
        conn.commit()
    engine.dispose()
    db = Database(db_url)
    with db.session() as s:
        assert [h.name for h in s.query(Host)] == ["h1"]
        (t,) = s.query(Task).all()
        assert t.id == 7 and t.state == "succeeded" and t.owner is None
    db.engine.dispose()
