"""``vm migrate --dry-run [--json]``, ``task show`` of a running migration and the report of a
finished shared-nothing one, as a user sees them.

The commands run through Typer against a small stand-in for the manager client that keeps the
tasks it was asked to start, so "starts nothing" is a fact about the stand-in's state.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from qmotion.api.migration import (
    MigrationPhase,
    MigrationPrediction,
    MigrationReport,
    MigrationStats,
    QemuMigrationStatus,
)
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.cli import task, vm
from qmotion.cli.main import app

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
runner = CliRunner()


def _prediction() -> MigrationPrediction:
    return MigrationPrediction(
        vm="web",
        source="h1",
        destination="h2",
        memory_bytes=1 << 30,
        resident_bytes=700 << 20,
        dirty_rate_bps=50e6,
        hot_set_bytes=0,
        sweep_bps=50e6,
        bandwidth_bps=47e6,
        bandwidth_from="probe",
        rtt_ms=0.2,
        converges=True,
        total_s=53.49,
        downtime_ms=143.0,
        passes=12,
        measures=["auto-converge", "downtime 300 ms"],
        max_throttle_pct=99,
        xbzrle=False,
        max_downtime_ms=300,
        completion_timeout_s=120.0,
        migration_address="198.19.1.12",
        streams=1,
    )


def _running(stats: MigrationStats) -> TaskOut:
    return TaskOut(
        id=9,
        kind="migrate",
        state=TaskState.RUNNING,
        vm="web",
        source="h1",
        destination="h2",
        phase=MigrationPhase.MONITOR,
        progress=0.4,
        created_at=NOW,
        started_at=NOW,
        ended_at=None,
        error=None,
        result=None,
        stats=stats,
        events=[],
    )


class Manager:
    """The manager client calls these commands make; migrations asked for are kept."""

    def __init__(self) -> None:
        self.started: list[tuple[str, MigrateRequest]] = []
        self.planned: list[tuple[str, MigrateRequest]] = []
        self.ended: TaskOut | None = None  # what the migration's task became, if it ended
        self.stats = MigrationStats(
            status=QemuMigrationStatus.ACTIVE,
            transferred=300 << 20,
            remaining=500 << 20,
            mbps=400.0,
            passes=3,
            throttle_pct=55,
            rung="throttle",
            downtime_limit_ms=300,
        )

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def plan_migration(self, name: str, req: MigrateRequest) -> MigrationPrediction:
        self.planned.append((name, req))
        return _prediction()

    def migrate(self, name: str, req: MigrateRequest) -> TaskOut:
        self.started.append((name, req))
        return _running(self.stats)

    def task(self, task_id: int) -> TaskOut:
        return self.ended or _running(self.stats)


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Manager:
    m = Manager()
    for module in (vm, task):
        monkeypatch.setattr(module, "server_client", lambda lab=None: m)
    return m


def _run(args: list[str]) -> Any:
    return runner.invoke(app, args, env={"COLUMNS": "200"})


def test_dry_run_prints_the_prediction_and_starts_nothing(manager: Manager) -> None:
    res = _run(["vm", "migrate", "web", "--to", "h2", "--max-downtime-ms", "300", "--dry-run"])
    assert res.exit_code == 0, res.output
    out = ANSI.sub("", res.stdout)
    for expected in (
        "web: h1 -> h2",
        "predicted total",
        "53.5 s",
        "143 ms (limit 300 ms)",
        "auto-converge, downtime 300 ms",
        "99%",
        "1 TCP stream(s) to 198.19.1.12",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert manager.started == []
    # The operator's knob reached the prediction: it is what the plan is made under.
    assert [(n, r.max_downtime_ms) for n, r in manager.planned] == [("web", 300)]


def test_dry_run_json_is_the_prediction(manager: Manager) -> None:
    res = _run(["vm", "migrate", "web", "--to", "h2", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    got = MigrationPrediction.model_validate(json.loads(res.stdout))
    assert got == _prediction()
    assert manager.started == []


def test_task_show_of_a_running_migration_names_the_rung(manager: Manager) -> None:
    res = _run(["task", "show", "9"])
    assert res.exit_code == 0, res.output
    out = ANSI.sub("", res.stdout)
    assert "rung throttle (downtime limit 300 ms, throttle 55%)" in out, out
    assert "500 MiB left" in out, out


def _shared_nothing_done() -> TaskOut:
    """Disks copied for 80 s, then 6 s of RAM: QEMU's total is the RAM phase only."""
    report = MigrationReport(
        outcome=MigrationPhase.DONE,
        vm="web",
        source="h1",
        destination="h2",
        total_ms=6012,
        downtime_ms=41,
        bytes=700 << 20,
        disk_copy_ms=80250.5,
        disk_bytes=4 << 30,
        wall_ms=88004.2,
    )
    return _running(MigrationStats(status=QemuMigrationStatus.COMPLETED)).model_copy(
        update={
            "state": TaskState.SUCCEEDED,
            "phase": MigrationPhase.DONE,
            "ended_at": NOW + timedelta(seconds=87.5),
            "result": report,
        }
    )


def test_a_shared_nothing_report_says_what_each_figure_covers(manager: Manager) -> None:
    manager.ended = _shared_nothing_done()
    res = _run(["vm", "migrate", "web", "--to", "h2", "--datastore", "local-h2"])
    assert res.exit_code == 0, res.output
    rows = {
        " ".join(cells[0].split()): cells[1].strip()
        for line in ANSI.sub("", res.stdout).splitlines()
        if len(cells := line.strip("│ ").split("│")) == 2
    }
    assert rows["disk copy (mirror start -> disks in sync) ms"] == "80250.5"
    assert rows["disk bytes copied"] == str(4 << 30)
    assert rows["RAM migration (QEMU: migrate issued -> completed) ms"] == "6012"
    assert rows["RAM bytes sent"] == str(700 << 20)
    assert rows["whole operation (task started -> ended) ms"] == "87500.0"
    assert not [label for label in rows if label.startswith("total")], rows

    res = _run(["vm", "migrate", "web", "--to", "h2", "--datastore", "local-h2", "--json"])
    got = json.loads(res.stdout)
    # The report's own fields as before; the whole operation's time added beside them.
    assert (got["total_ms"], got["disk_copy_ms"], got["wall_ms"]) == (6012, 80250.5, 88004.2)
    assert got["operation_ms"] == 87500.0

    res = _run(["task", "report", "9"])
    assert res.exit_code == 0, res.output
    line = ANSI.sub("", res.stdout).splitlines()[0]
    assert "whole task 87.50 s, disk copy 80.25 s, RAM migration (QEMU) 6.01 s" in line
