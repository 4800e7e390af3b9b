"""``qmotion task report``: the flight recorder as a table, as JSON and as a plot."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qmotion.api.migration import FlightSample, MigrationPhase, MigrationReport
from qmotion.api.server import TaskOut, TaskState
from qmotion.cli import task
from qmotion.cli.main import app

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def _report() -> MigrationReport:
    samples = [
        FlightSample(
            t_s=float(i),
            transferred=i * 100 << 20,
            remaining=max(600 - i * 100, 5) << 20,
            dirty_bps=40 << 20,
            throughput_bps=100 << 20,
            throttle_pct=0 if i < 3 else 30,
            passes=1 + i // 3,
            rung="precopy" if i < 3 else "throttle",
            downtime_limit_ms=20,
        )
        for i in range(8)
    ]
    return MigrationReport(
        outcome=MigrationPhase.DONE,
        vm="web",
        source="h1",
        destination="h2",
        total_ms=8100,
        downtime_ms=12,
        wall_ms=9000.0,
        source_stopped_at_ms=5000.0,
        steer_ms=3.5,
        guest_paused_ms=41.0,
        guest_frame_ms=38.0,  # before the agent saw RESUME: the timeline sorts by time
        client_frame_ms=95.5,
        rungs=["precopy", "throttle"],
        samples=samples,
        tls=True,
        streams=2,
        migration_address="198.19.1.12",
    )


class Fake:
    def __init__(self, result: MigrationReport | None) -> None:
        self.result = result

    def __enter__(self) -> Fake:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def task(self, task_id: int) -> TaskOut:
        return TaskOut(
            id=task_id,
            kind="migrate",
            state=TaskState.SUCCEEDED if self.result else TaskState.RUNNING,
            vm="web",
            source="h1",
            destination="h2",
            phase=MigrationPhase.DONE if self.result else MigrationPhase.MONITOR,
            progress=1.0,
            created_at=NOW,
            started_at=NOW,
            ended_at=None,
            error=None,
            result=self.result,
            stats=None,
            events=[],
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    f = Fake(_report())
    monkeypatch.setattr(task, "server_client", lambda lab=None: f)
    return f


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["task", "report", *args], env={"COLUMNS": "200"})
    return res.exit_code, res.output


def test_the_report_shows_samples_rungs_and_the_switchover(fake: Fake) -> None:
    code, out = _run("4")
    assert code == 0, out
    assert "2 stream(s) to 198.19.1.12, TLS yes, rungs precopy > throttle" in out
    assert "throttle" in out and "600" in out  # a sample row: the first remaining MiB
    # The switchover in order, to the tenth of a millisecond, from the source's stop.
    marks = ("source stopped", "network steered", "downtime ends", "guest on", "resumed", "client")
    at = [out.index(s) for s in marks]
    assert at == sorted(at)
    assert "+    41.0 ms  destination resumed" in out


def test_json_carries_the_timeline(fake: Fake) -> None:
    code, out = _run("4", "--json")
    assert code == 0, out
    got = json.loads(out)
    assert [e["ms"] for e in got["timeline"]] == [0.0, 3.5, 12.0, 38.0, 41.0, 95.5]
    assert len(got["samples"]) == 8 and got["tls"] is True


def test_plot_writes_a_png(fake: Fake, tmp_path: Path) -> None:
    png = tmp_path / "m.png"
    code, out = _run("4", "--plot", str(png))
    assert code == 0, out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_no_report_yet_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task, "server_client", lambda lab=None: Fake(None))
    code, out = _run("4")
    assert code == 1 and "no report yet" in out
