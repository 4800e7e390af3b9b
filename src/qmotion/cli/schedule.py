"""``qmotion schedule``: one-off or recurring operations that the manager runs on its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from qmotion.api.schedule import ScheduleAction, ScheduleCreate, ScheduleOut
from qmotion.api.sizes import parse_duration_s
from qmotion.cli.common import cells, console, errors_exit, fail, print_json
from qmotion.cli.connect import server_client

app = typer.Typer(
    help="Schedules: a migration, a DRS round or a maintenance change at a time or on a cron "
    "timetable (UTC), run by the manager; each run is a task."
)
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")
ONE_ACTION = (
    "give one action: --migrate VM --to HOST, --drs, --maintenance-enter HOST "
    "or --maintenance-exit HOST"
)


def parse_when(text: str, now: datetime) -> datetime:
    """``+30m`` (from ``now``) or an ISO 8601 time with its offset; ValueError if neither."""
    t = text.strip()
    if t.startswith("+"):
        return now + timedelta(seconds=parse_duration_s(t[1:]))
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"expected +30m/+2h or an ISO 8601 time such as 2026-12-01T02:00:00Z, got {text!r}"
        ) from None
    if when.tzinfo is None:
        # The manager's clock is UTC; guessing the zone of a bare time would move it silently.
        raise ValueError(f"{text!r} has no offset: add Z (UTC) or one such as +02:00")
    return when


def _time(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def describe(s: ScheduleOut) -> str:
    """What the schedule does, in words."""
    match s.action:
        case ScheduleAction.MIGRATE:
            return f"migrate {s.vm} to {s.to}"
        case ScheduleAction.DRS:
            return "drs round"
        case ScheduleAction.MAINTENANCE_ENTER:
            return f"maintenance enter {s.host}"
        case ScheduleAction.MAINTENANCE_EXIT:
            return f"maintenance exit {s.host}"


def _when(s: ScheduleOut) -> str:
    return f"cron {s.cron}" if s.cron is not None else f"at {_time(s.at)}"


def _state(s: ScheduleOut) -> str:
    return "finished" if s.finished else f"next {_time(s.next_run_at)}"


@app.command("create")
def create(
    at: str = typer.Option(None, "--at", help="Once: ISO 8601 with offset, or +30m / +2h."),
    cron: str = typer.Option(None, "--cron", help="Recurring: 5-field cron in UTC, '0 2 * * *'."),
    migrate: str = typer.Option(None, "--migrate", metavar="VM", help="Migrate this VM (--to)."),
    to: str = typer.Option(None, "--to", metavar="HOST", help="With --migrate: destination."),
    drs: bool = typer.Option(False, "--drs", help="Run a DRS balancing round."),
    enter: str = typer.Option(
        None, "--maintenance-enter", metavar="HOST", help="Put this host into maintenance."
    ),
    exit_: str = typer.Option(
        None, "--maintenance-exit", metavar="HOST", help="Take this host out of maintenance."
    ),
    name: str = typer.Option(None, "--name", help="A name to recognise it by."),
    grace: str = typer.Option(
        "10m", "--grace", help="A run found this late (manager down) still runs; later: missed."
    ),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Schedule an operation once (--at) or on a timetable (--cron)."""
    actions = [
        (ScheduleAction.MIGRATE, migrate is not None),
        (ScheduleAction.DRS, drs),
        (ScheduleAction.MAINTENANCE_ENTER, enter is not None),
        (ScheduleAction.MAINTENANCE_EXIT, exit_ is not None),
    ]
    chosen = [a for a, given in actions if given]
    if len(chosen) != 1:
        fail(ONE_ACTION, 2)
    try:
        grace_s = parse_duration_s(grace)
    except ValueError as exc:
        fail(f"--grace: {exc}", 2)
    body: dict[str, Any] = {"action": chosen[0], "grace_s": grace_s}
    if at is not None:
        try:
            body["at"] = parse_when(at, datetime.now(UTC))
        except ValueError as exc:
            fail(f"--at: {exc}", 2)
    optional = {
        "cron": cron,
        "name": name,
        "vm": migrate,
        "to": to,
        "host": enter if enter is not None else exit_,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    # Validated here first (the same model the manager uses): --to without --migrate, both
    # --at and --cron, a bad cron are refused before any request, naming the field.
    with errors_exit():
        req = ScheduleCreate.model_validate(body)
        with server_client(lab) as client:
            s = client.create_schedule(req)
    if json_out:
        print_json(s.model_dump(mode="json"))
        return
    console.print(Text(f"schedule {s.id} created: {describe(s)}, {_when(s)}; {_state(s)}"))


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Every schedule, with its next and last run."""
    with errors_exit(), server_client(lab) as client:
        schedules = client.schedules()
    if json_out:
        print_json([s.model_dump(mode="json") for s in schedules])
        return
    table = Table("id", "name", "when", "action", "next run", "last run", "last outcome")
    for s in schedules:
        last = s.runs[0] if s.runs else None
        table.add_row(
            *cells(
                s.id,
                s.name or "-",
                _when(s),
                describe(s),
                "finished" if s.finished else _time(s.next_run_at),
                _time(last.ran_at if last else None),
                last.outcome if last else "-",
            )
        )
    console.print(table)


@app.command("show")
def show(
    schedule_id: int, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt
) -> None:
    """One schedule with its run history, newest first."""
    with errors_exit(), server_client(lab) as client:
        s = client.schedule(schedule_id)
    if json_out:
        print_json(s.model_dump(mode="json"))
        return
    title = f"schedule {s.id}" + (f" ({s.name})" if s.name else "")
    console.print(Text(f"{title}: {describe(s)}, {_when(s)}; {_state(s)}"))
    console.print(
        Text(
            f"  grace {s.grace_s} s, created {_time(s.created_at)}, last run {_time(s.last_run_at)}"
        )
    )
    if not s.runs:
        console.print(Text("  no runs yet"))
        return
    table = Table("due", "ran", "outcome", "task", "message")
    for r in s.runs:
        table.add_row(
            *cells(
                _time(r.at),
                _time(r.ran_at),
                r.outcome,
                r.task_id if r.task_id is not None else "-",
                r.message,
            )
        )
    console.print(table)


@app.command("delete")
def delete(
    schedule_id: int,
    json_out: bool = typer.Option(False, "--json", help='Print {"deleted": ID}.'),
    lab: str = LabOpt,
) -> None:
    """Delete a schedule and its run history (tasks it started are kept)."""
    with errors_exit(), server_client(lab) as client:
        client.delete_schedule(schedule_id)
    if json_out:
        print_json({"deleted": schedule_id})
        return
    console.print(Text(f"schedule {schedule_id} deleted"))
