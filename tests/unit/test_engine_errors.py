"""The engine and errors that are not qmotion's (a database error, a bug) in an action or in
``persist``: never the end of a migration QEMU may be moving (issue 22). The same action, or
the same persist, is tried again after a backoff; asyncio's cancellation still passes."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.exc import OperationalError

from qmotion.api.migration import MigrationStats
from qmotion.migration import engine
from qmotion.migration.errors import StepError
from qmotion.migration.vocabulary import MigrationState, Phase, Step
from tests.unit.test_engine import FakeCluster, FakePort


def _db_error() -> OperationalError:
    return OperationalError("UPDATE tasks SET ...", {}, Exception("database is locked"))


class Recorder:
    """The persisted steps, and the waits the engine asked for."""

    def __init__(self, fail_persist_in: Phase | None = None) -> None:
        self.steps: list[Step] = []
        self.waits: list[float] = []
        self._fail_in = fail_persist_in

    async def persist(self, s: Step, stats: MigrationStats | None) -> None:
        if self._fail_in is not None and s.state.phase == self._fail_in:
            self._fail_in = None
            raise _db_error()
        self.steps.append(s)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def _run(port: FakePort, rec: Recorder) -> MigrationState:
    async def main() -> MigrationState:
        return await engine.run(port, rec.persist, asyncio.Event(), sleep=rec.sleep)

    return asyncio.run(main())


def test_a_database_error_in_persist_while_monitoring_is_retried() -> None:
    cluster = FakeCluster()
    rec = Recorder(fail_persist_in=Phase.MONITOR)
    final = _run(FakePort(cluster, script=["active", "active", "completed"]), rec)
    assert final.phase == Phase.DONE
    assert cluster.copies == {"h2": "running"} and cluster.inventory_host == "h2"
    assert rec.waits == [1.0]  # one backoff, then the same step persisted
    assert [s.state.phase for s in rec.steps].count(Phase.MONITOR) >= 1


class Flaky(FakePort):
    """A port whose ``progress`` raises what is not qmotion's, ``times`` times."""

    def __init__(self, cluster: FakeCluster, exc: BaseException, times: int) -> None:
        super().__init__(cluster, script=["active", "completed"])
        self.exc, self.times = exc, times

    async def progress(self, known_status: str | None) -> MigrationStats:
        if self.times > 0:
            self.times -= 1
            raise self.exc
        return await super().progress(known_status)


def test_an_unexpected_error_in_an_action_is_retried_with_backoff() -> None:
    cluster = FakeCluster()
    rec = Recorder()
    final = _run(Flaky(cluster, _db_error(), times=7), rec)
    assert final.phase == Phase.DONE and cluster.copies == {"h2": "running"}
    assert rec.waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # Recorded as it happened (best effort): the operator sees why the task waits.
    assert any("unexpected error" in s.note for s in rec.steps)


def test_cancellation_is_never_caught() -> None:
    cluster = FakeCluster()
    with pytest.raises(asyncio.CancelledError):
        _run(Flaky(cluster, asyncio.CancelledError(), times=1), Recorder())


def test_before_anything_was_made_an_unexpected_error_ends_the_task() -> None:
    cluster = FakeCluster()
    port = FakePort(cluster)

    async def broken() -> None:
        raise RuntimeError("a bug in the pre-checks")

    port.prechecks = broken  # type: ignore[method-assign]
    rec = Recorder()
    final = _run(port, rec)
    assert final.phase == Phase.FAILED and "internal error" in (final.error or "")
    assert cluster.copies == {"h1": "running"} and rec.waits == []


def test_the_engine_waits_the_backoff_the_machine_decides() -> None:
    cluster = FakeCluster()
    port = FakePort(cluster, script=["completed"])
    real = port.confirm_source
    failures = 3

    async def lost_answers() -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise StepError("stop source", "host h1: unreachable")
        await real()

    port.confirm_source = lost_answers  # type: ignore[method-assign]
    rec = Recorder()
    final = _run(port, rec)
    assert final.phase == Phase.DONE and not final.unconfirmed
    assert rec.waits == [0.5, 1.0, 2.0]
