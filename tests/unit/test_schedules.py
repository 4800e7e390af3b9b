"""Scheduled operations: the timing rules (properties), the store and its loop on SQLite with
fake actions and a hand-moved clock, restarts, the routes, the client and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from qmotion.api.schedule import ScheduleAction, ScheduleCreate
from qmotion.api.service import install_error_handlers
from qmotion.api.sizes import parse_duration_s
from qmotion.cli import schedule as schedule_cli
from qmotion.client import errors as client_errors
from qmotion.client.server import ServerClient

# Also registers the schedule tables on Base, before any Database below runs create_all.
from qmotion.server.automation.schedules import Schedules, decide, next_after
from qmotion.server.db import Database
from qmotion.server.errors import Conflict, ManagerError
from qmotion.server.http.schedule_routes import install_routes

T0 = datetime(2026, 12, 1, 10, 7, tzinfo=UTC)
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
CRONS = ["* * * * *", "*/15 * * * *", "0 2 * * *", "30 4 1 * *", "0 0 * * MON-FRI", "0 0 L 2 *"]
OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from(OFFSETS),
)
RANK = {"wait": 0, "run": 1, "missed": 2}


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FakeActions:
    """Records every call; raises ``error`` instead of starting a task when it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.error: BaseException | None = None
        self._next_task = 100

    def _start(self, *call: str) -> int:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        self._next_task += 1
        return self._next_task

    async def migrate(self, vm: str, to: str) -> int:
        return self._start("migrate", vm, to)

    async def drs(self) -> int:
        return self._start("drs")

    async def maintenance_enter(self, host: str) -> int:
        return self._start("maintenance_enter", host)

    async def maintenance_exit(self, host: str) -> int:
        return self._start("maintenance_exit", host)


def open_schedules(path: Path, clock: Clock, actions: FakeActions | None = None) -> Schedules:
    return Schedules(Database(f"sqlite:///{path / 'm.db'}"), actions or FakeActions(), clock)


def req(**fields: Any) -> ScheduleCreate:
    body: dict[str, Any] = {"action": "migrate", "vm": "web1", "to": "h2"} | fields
    return ScheduleCreate.model_validate(body)


# --- the pure rules ---------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(CRONS), times)
def test_next_after_is_the_first_cron_time_strictly_after(cron: str, after: datetime) -> None:
    nxt = next_after(None, cron, after)
    assert nxt is not None and nxt > after
    assert nxt.tzinfo is not None and nxt.utcoffset() == timedelta(0)
    assert (nxt.second, nxt.microsecond) == (0, 0)
    # Nothing fires in between: from just before it, the next time is it again.
    assert next_after(None, cron, nxt - timedelta(microseconds=1)) == nxt


@SETTINGS
@given(
    st.sampled_from(CRONS),
    times,
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=40)),
)
def test_next_after_is_monotone(cron: str, after: datetime, later: timedelta) -> None:
    a, b = next_after(None, cron, after), next_after(None, cron, after + later)
    assert a is not None and b is not None and a <= b


@SETTINGS
@given(times, times)
def test_next_after_of_a_one_off(at: datetime, after: datetime) -> None:
    nxt = next_after(at, None, after)
    assert nxt == (at if at > after else None)
    assert nxt is None or nxt > after


def test_next_after_takes_at_or_cron() -> None:
    assert next_after(None, None, T0) is None
    with pytest.raises(ValueError, match="not both"):
        next_after(T0, "* * * * *", T0)


@SETTINGS
@given(
    st.one_of(st.none(), times),
    times,
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
    st.integers(min_value=0, max_value=86400),
)
def test_decide_is_monotone_in_now(
    due: datetime | None, now: datetime, later: timedelta, grace_s: int
) -> None:
    first, second = decide(due, now, grace_s), decide(due, now + later, grace_s)
    assert RANK[first] <= RANK[second]
    if due is None:
        assert first == second == "wait"
    else:
        assert (first == "wait") == (now < due)


@SETTINGS
@given(times, st.integers(min_value=0, max_value=86400))
def test_decide_runs_up_to_the_grace_and_no_later(due: datetime, grace_s: int) -> None:
    grace = timedelta(seconds=grace_s)
    assert decide(due, due - timedelta(microseconds=1), grace_s) == "wait"
    assert decide(due, due, grace_s) == "run"
    assert decide(due, due + grace, grace_s) == "run"
    assert decide(due, due + grace + timedelta(microseconds=1), grace_s) == "missed"


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"cron": "61 * * * *"}, "cron", "Bad minute"),
        ({"cron": "0 0 * * * *"}, "cron", "expected 5 fields"),
        ({"cron": "@daily"}, "cron", "expected 5 fields"),
        ({}, "cron", "give when"),
        ({"at": "2027-01-01T00:00:00Z", "cron": "* * * * *"}, "cron", "not both"),
        ({"at": "2027-01-01T00:00:00"}, "at", "timezone"),
        ({"cron": "* * * * *", "to": None}, "to", "needs to"),
        ({"cron": "* * * * *", "vm": None}, "vm", "needs vm"),
        ({"cron": "* * * * *", "action": "drs"}, "vm", "goes with the migrate action"),
        ({"cron": "* * * * *", "host": "h1"}, "host", "goes with the maintenance_enter"),
        ({"cron": "* * * * *", "action": "maintenance_exit", "vm": None, "to": None},
         "host", "needs host"),
        ({"cron": "* * * * *", "action": "reboot"}, "action", "Input should be"),
        ({"cron": "* * * * *", "grace_s": 86401}, "grace_s", "less than or equal"),
        ({"cron": "* * * * *", "when": "now"}, "when", "Extra inputs"),
    ],
)  # fmt: skip
def test_a_bad_request_is_refused_naming_its_field(
    body: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ValidationError) as info:
        req(**body)
    first = info.value.errors()[0]
    assert first["loc"] == (field,), info.value
    assert reason in first["msg"], first["msg"]


def test_a_good_request_is_normalised() -> None:
    r = req(cron="  0   2 * *  * ", action="drs", vm=None, to=None)
    assert (r.cron, r.action, r.grace_s) == ("0 2 * * *", ScheduleAction.DRS, 600)
    at = req(at="2027-01-01T03:00:00+02:00").at
    assert at == datetime(2027, 1, 1, 1, tzinfo=UTC) and at.utcoffset() == timedelta(0)


def test_create_refuses_a_time_that_has_passed(tmp_path: Path) -> None:
    schedules = open_schedules(tmp_path, Clock())
    with pytest.raises(ManagerError) as info:
        schedules.create(req(at=T0))
    assert (info.value.status, info.value.field) == (422, "at")
    assert "not in the future" in info.value.message
    assert schedules.list() == []
    # Day 1 of February and its fifth Monday (both, as one field starts with *): never.
    with pytest.raises(ManagerError) as info:
        schedules.create(req(cron="0 0 */31 2 1#5"))
    assert (info.value.status, info.value.field) == (422, "cron")
    assert "never fires" in info.value.message


# --- the store and its loop -------------------------------------------------------------


def test_a_one_off_runs_once_and_is_finished(tmp_path: Path) -> None:
    clock, actions = Clock(), FakeActions()
    schedules = open_schedules(tmp_path, clock, actions)
    s = schedules.create(req(at=T0 + timedelta(hours=1), name="move-web1"))
    assert (s.next_run_at, s.finished, s.runs) == (T0 + timedelta(hours=1), False, [])
    asyncio.run(schedules.tick())
    assert actions.calls == []
    clock.advance(hours=1, seconds=3)
    asyncio.run(schedules.tick())
    asyncio.run(schedules.tick())
    assert actions.calls == [("migrate", "web1", "h2")]
    done = schedules.get(s.id)
    assert done.finished and done.next_run_at is None and done.last_run_at == clock.now
    [run] = done.runs
    assert (run.at, run.ran_at, run.outcome, run.task_id) == (
        T0 + timedelta(hours=1),
        clock.now,
        "started",
        101,
    )
    clock.advance(days=400)
    asyncio.run(schedules.tick())
    assert len(actions.calls) == 1


def test_a_cron_schedule_runs_at_each_of_its_times(tmp_path: Path) -> None:
    clock, actions = Clock(), FakeActions()
    schedules = open_schedules(tmp_path, clock, actions)
    s = schedules.create(
        req(cron="*/15 * * * *", action="maintenance_enter", vm=None, to=None, host="h1")
    )
    assert s.next_run_at == datetime(2026, 12, 1, 10, 15, tzinfo=UTC)
    for _ in range(60):  # an hour, a tick a minute
        clock.advance(minutes=1)
        asyncio.run(schedules.tick())
    out = schedules.get(s.id)
    assert actions.calls == [("maintenance_enter", "h1")] * 4
    assert [r.at.strftime("%H:%M") for r in out.runs] == ["11:00", "10:45", "10:30", "10:15"]
    assert [r.task_id for r in out.runs] == [104, 103, 102, 101]
    assert out.next_run_at == datetime(2026, 12, 1, 11, 15, tzinfo=UTC) and not out.finished


def test_a_restart_keeps_schedules_and_runs_a_late_one_once_within_grace(tmp_path: Path) -> None:
    clock = Clock()
    before = open_schedules(tmp_path, clock)
    one_off = before.create(req(at=T0 + timedelta(minutes=30)))
    hourly = before.create(req(cron="0 * * * *", action="drs", vm=None, to=None))
    before.db.engine.dispose()  # the manager stops before either is due
    clock.advance(minutes=58)  # 10:07 + 58 min: 8 min after the hourly run at 11:00
    actions = FakeActions()
    after = open_schedules(tmp_path, clock, actions)
    assert [s.id for s in after.list()] == [one_off.id, hourly.id]
    asyncio.run(after.tick())
    asyncio.run(after.tick())
    # The one-off is 28 min late (beyond 10 min): missed and finished; the hourly, 5 min late.
    assert actions.calls == [("drs",)]
    missed = after.get(one_off.id)
    assert missed.finished and missed.last_run_at is None
    assert [(r.outcome, r.task_id) for r in missed.runs] == [("missed", None)]
    assert "beyond its 600 s grace" in missed.runs[0].message
    ran = after.get(hourly.id)
    assert [(r.outcome, r.at) for r in ran.runs] == [("started", T0.replace(hour=11, minute=0))]
    assert ran.next_run_at == T0.replace(hour=12, minute=0)


def test_a_long_outage_is_one_missed_record_then_the_next_time(tmp_path: Path) -> None:
    clock, actions = Clock(), FakeActions()
    schedules = open_schedules(tmp_path, clock, actions)
    hourly = schedules.create(req(cron="0 * * * *", grace_s=300))
    quarter = schedules.create(req(cron="*/15 * * * *", action="drs", vm=None, to=None))
    schedules.db.engine.dispose()
    clock.now = datetime(2026, 12, 3, 13, 7, tzinfo=UTC)  # two days later
    after = open_schedules(tmp_path, clock, actions)
    asyncio.run(after.tick())
    h = after.get(hourly.id)
    assert [(r.outcome, r.at) for r in h.runs] == [("missed", T0.replace(hour=11, minute=0))]
    assert h.next_run_at == clock.now.replace(hour=14, minute=0) and not h.finished
    # Beyond grace from 10:15 two days ago, but 13:00 is 7 min ago: within 10 min, it runs.
    q = after.get(quarter.id)
    assert [(r.outcome, r.at.strftime("%d %H:%M")) for r in q.runs] == [
        ("started", "03 13:00"),
        ("missed", "01 10:15"),
    ]
    assert q.next_run_at == clock.now.replace(minute=15)
    assert actions.calls == [("drs",)]


def test_a_failing_action_is_recorded_and_the_schedule_goes_on(tmp_path: Path) -> None:
    clock, actions = Clock(), FakeActions()
    schedules = open_schedules(tmp_path, clock, actions)
    s = schedules.create(req(cron="*/15 * * * *"))
    other = schedules.create(req(cron="*/15 * * * *", action="drs", vm=None, to=None))
    actions.error = Conflict("VM web1 is migrating already", vm="web1")
    clock.now = T0.replace(minute=15)
    asyncio.run(schedules.tick())
    failed = schedules.get(s.id)
    assert [(r.outcome, r.task_id, r.message) for r in failed.runs] == [
        ("failed", None, "VM web1 is migrating already")
    ]
    assert failed.next_run_at == T0.replace(minute=30)
    actions.error = RuntimeError("a bug in an action")
    clock.now = T0.replace(minute=30)
    asyncio.run(schedules.tick())
    assert schedules.get(other.id).runs[0].message == "RuntimeError: a bug in an action"
    actions.error = None
    clock.now = T0.replace(minute=45)
    asyncio.run(schedules.tick())
    assert [r.outcome for r in schedules.get(s.id).runs] == ["started", "failed", "failed"]
    assert len(actions.calls) == 6


def test_a_cancelled_tick_is_not_swallowed(tmp_path: Path) -> None:
    clock, actions = Clock(), FakeActions()
    schedules = open_schedules(tmp_path, clock, actions)
    s = schedules.create(req(cron="*/15 * * * *"))
    actions.error = asyncio.CancelledError()
    clock.now = T0.replace(minute=15)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(schedules.tick())
    # Claimed before the action was called: not run twice, even if the manager stops here.
    assert schedules.get(s.id).next_run_at == T0.replace(minute=30)


class Signalling(FakeActions):
    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()

    async def migrate(self, vm: str, to: str) -> int:
        self.called.set()
        return await super().migrate(vm, to)


def test_run_forever_survives_a_bad_round(tmp_path: Path) -> None:
    clock, actions = Clock(), Signalling()
    schedules = open_schedules(tmp_path, clock, actions)
    schedules.create(req(at=T0 + timedelta(minutes=1)))
    rounds = 0

    def flaky() -> datetime:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise OSError("clock read failed")
        return T0 + timedelta(minutes=2)

    schedules.clock = flaky

    async def main() -> None:
        loop = asyncio.ensure_future(schedules.run_forever(interval_s=0.01))
        await actions.called.wait()
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(asyncio.wait_for(main(), 5))
    assert rounds >= 2 and actions.calls == [("migrate", "web1", "h2")]


def test_delete_removes_a_schedule_and_its_runs(tmp_path: Path) -> None:
    clock = Clock()
    schedules = open_schedules(tmp_path, clock)
    s = schedules.create(req(cron="* * * * *"))
    clock.advance(minutes=1)
    asyncio.run(schedules.tick())
    schedules.delete(s.id)
    assert schedules.list() == []
    for call in (schedules.get, schedules.delete):
        with pytest.raises(ManagerError) as info:
            call(s.id)
        assert info.value.status == 404


# --- the routes, the client and the CLI --------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app, ManagerError)
    app.state.schedules = open_schedules(tmp_path, Clock(datetime.now(UTC)))
    install_routes(app, app.state.schedules, [])
    with TestClient(app) as client:
        yield client


def test_routes(api: TestClient) -> None:
    r = api.post("/v1/schedules", json={"cron": "0 2 * * *", "action": "drs", "name": "nightly"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["name"], created["finished"], created["runs"]) == ("nightly", False, [])
    assert [s["id"] for s in api.get("/v1/schedules").json()] == [created["id"]]
    assert api.get(f"/v1/schedules/{created['id']}").json() == created
    for body, field in [
        ({"cron": "0 2 * *", "action": "drs"}, "cron"),
        ({"at": "2001-01-01T00:00:00Z", "action": "drs"}, "at"),
        ({"cron": "0 2 * * *", "action": "drs", "to": "h2"}, "to"),
    ]:
        r = api.post("/v1/schedules", json=body)
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), r.text
    assert api.get("/v1/schedules/0").status_code == 422
    assert api.get(f"/v1/schedules/{2**63}").status_code == 422
    assert api.delete(f"/v1/schedules/{created['id']}").status_code == 204
    for r in (api.get(f"/v1/schedules/{created['id']}"), api.delete("/v1/schedules/7")):
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


def client_over(api: TestClient) -> ServerClient:
    def forward(request: httpx.Request) -> httpx.Response:
        r = api.request(
            request.method, request.url.path, content=request.content, headers=request.headers
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return ServerClient("http://manager", "t" * 16, transport=httpx.MockTransport(forward))


def test_client_round_trip(api: TestClient) -> None:
    with client_over(api) as client:
        s = client.create_schedule(req(at=datetime.now(UTC) + timedelta(hours=1)))
        assert client.schedules() == [s] and client.schedule(s.id) == s
        client.delete_schedule(s.id)
        with pytest.raises(client_errors.NotFound):
            client.schedule(s.id)


def test_cli(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule_cli, "server_client", lambda lab=None: client_over(api))
    runner = CliRunner()
    res = runner.invoke(
        schedule_cli.app, ["create", "--at", "+30m", "--migrate", "web1", "--to", "h2"]
    )
    assert res.exit_code == 0, res.output
    assert "schedule 1 created: migrate web1 to h2, at " in res.stdout
    # An hour half a day away: the clock advances 31 minutes from now below, and a fixed
    # "0 3 * * *" fired too (taking task 101) when the test ran between 02:29 and 03:00 UTC.
    cron = f"0 {(datetime.now(UTC) + timedelta(hours=12)).hour} * * *"
    res = runner.invoke(
        schedule_cli.app, ["create", "--cron", cron, "--drs", "--name", "nightly", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert f'"cron": "{cron}"' in res.stdout
    res = runner.invoke(schedule_cli.app, ["list"])
    assert res.exit_code == 0 and "nightly" in res.stdout and "web1" in res.stdout
    res = runner.invoke(schedule_cli.app, ["list", "--json"])
    assert [(s["id"], s["action"]) for s in json.loads(res.stdout)] == [(1, "migrate"), (2, "drs")]
    res = runner.invoke(schedule_cli.app, ["show", "1"])
    assert res.exit_code == 0 and "no runs yet" in res.stdout
    schedules: Schedules = api.app.state.schedules  # type: ignore[attr-defined]
    assert isinstance(schedules.clock, Clock)
    schedules.clock.advance(minutes=31)
    asyncio.run(schedules.tick())
    res = runner.invoke(schedule_cli.app, ["show", "1", "--json"])
    assert [(r["outcome"], r["task_id"]) for r in json.loads(res.stdout)["runs"]] == [
        ("started", 101)
    ]
    res = runner.invoke(schedule_cli.app, ["show", "1"])
    assert res.exit_code == 0 and "finished" in res.stdout and "101" in res.stdout
    for args, message in [
        (["--cron", "* * * * *", "--drs", "--maintenance-exit", "h1"], "give one action"),
        (["--cron", "* * * * *"], "give one action"),
        (["--cron", "* * * * *", "--drs", "--to", "h2"], "to: Value error, to goes with"),
        (["--at", "2030-01-01T00:00", "--drs"], "--at: '2030-01-01T00:00' has no offset"),
        (["--at", "+1h", "--drs", "--grace", "10 min"], "--grace: expected a duration"),
    ]:
        res = runner.invoke(schedule_cli.app, ["create", *args])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.stderr.split()), res.stderr
    res = runner.invoke(schedule_cli.app, ["create", "--at", "2001-01-01T00:00Z", "--drs"])
    assert res.exit_code == 2 and "field=at" in res.stderr, res.stderr
    assert runner.invoke(schedule_cli.app, ["delete", "1"]).exit_code == 0
    res = runner.invoke(schedule_cli.app, ["delete", "1"])
    assert res.exit_code == 2 and "no schedule 1" in res.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("600", 600), ("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration_s(text) == seconds


def test_parse_when() -> None:
    assert schedule_cli.parse_when("+30m", T0) == T0 + timedelta(minutes=30)
    assert schedule_cli.parse_when("2027-01-01T02:00:00+02:00", T0) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    for bad in ("tomorrow", "+", "+5x", "2027-01-01 02:00"):
        with pytest.raises(ValueError):
            schedule_cli.parse_when(bad, T0)
