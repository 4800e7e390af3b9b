"""Wire models of scheduled operations: a one-off (at) or recurring (cron) manager action."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
)

from qmotion.api.vm import NAME_PATTERN, StrictModel

# Runs returned with a schedule, newest first (the database keeps more of them).
RUNS_SHOWN = 20
CRON_FIELDS = "minute hour day-of-month month day-of-week"


class ScheduleAction(StrEnum):
    MIGRATE = "migrate"
    DRS = "drs"
    MAINTENANCE_ENTER = "maintenance_enter"
    MAINTENANCE_EXIT = "maintenance_exit"


RunOutcome = Literal["started", "missed", "failed"]


def _utc(value: datetime) -> datetime:
    # An offset that pushes a time past datetime's range would otherwise fail in the database.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range") from None


def check_cron(expr: str) -> str:
    """A standard 5-field cron expression (UTC), normalised to single spaces; ValueError if not.

    cronsim also takes a sixth (seconds) field, which cron does not have: refused here."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected 5 fields ({CRON_FIELDS}), got {len(fields)}: {expr!r}; e.g. '0 2 * * *'"
        )
    normal = " ".join(fields)
    try:
        CronSim(normal, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"{exc} in {normal!r} (fields: {CRON_FIELDS})") from None
    return normal


UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
_NEEDS: dict[str, tuple[ScheduleAction, ...]] = {
    "vm": (ScheduleAction.MIGRATE,),
    "to": (ScheduleAction.MIGRATE,),
    "host": (ScheduleAction.MAINTENANCE_ENTER, ScheduleAction.MAINTENANCE_EXIT),
}


class ScheduleCreate(StrictModel):
    """When (exactly one of ``at`` and ``cron``) and what (``action`` with its arguments).

    Cross-field checks are field validators, not a model validator, so that a refusal names
    the field it is about (``error.field``)."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    at: UtcTime | None = Field(
        default=None, description="one-off: when, with an offset (e.g. 2026-12-01T02:00:00Z)"
    )
    cron: str | None = Field(
        default=None,
        max_length=256,
        validate_default=True,
        description=f"recurring: a 5-field cron expression in UTC ({CRON_FIELDS})",
    )
    action: ScheduleAction
    vm: Name | None = Field(
        default=None, validate_default=True, description="migrate: the VM to move"
    )
    to: Name | None = Field(
        default=None, validate_default=True, description="migrate: the destination host"
    )
    host: Name | None = Field(
        default=None, validate_default=True, description="maintenance_enter/exit: the host"
    )
    grace_s: int = Field(
        default=600,
        ge=0,
        le=86400,
        description="a run found late by up to this much (the manager was down) still runs; "
        "later than that it is recorded as missed",
    )

    @field_validator("cron")
    @classmethod
    def _one_time(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "at" not in info.data:  # at itself was refused: that error says it
            return v if v is None else check_cron(v)
        at = info.data["at"]
        if at is not None and v is not None:
            raise ValueError("give either at (one-off) or cron (recurring), not both")
        if at is None and v is None:
            raise ValueError("give when: at (a one-off time) or cron (a recurring expression)")
        return v if v is None else check_cron(v)

    @field_validator("vm", "to", "host")
    @classmethod
    def _argument_of_action(cls, v: str | None, info: ValidationInfo) -> str | None:
        action = info.data.get("action")
        if action is None or info.field_name is None:  # action was refused: that error says it
            return v
        field = info.field_name
        needs = _NEEDS[field]
        if v is None and action in needs:
            raise ValueError(f"the {action} action needs {field}")
        if v is not None and action not in needs:
            users = " and ".join(str(a) for a in needs)
            raise ValueError(f"{field} goes with the {users} action, not {action}")
        return v


class ScheduleRunOut(BaseModel):
    at: datetime = Field(description="the time the run was due")
    ran_at: datetime = Field(description="when the manager acted on it (or found it missed)")
    outcome: RunOutcome
    task_id: int | None = Field(description="the manager task it started")
    message: str


class ScheduleOut(BaseModel):
    id: int
    name: str | None
    at: datetime | None
    cron: str | None
    action: ScheduleAction
    vm: str | None
    to: str | None
    host: str | None
    grace_s: int
    next_run_at: datetime | None = Field(description="None: finished, it will not run again")
    finished: bool
    created_at: datetime
    last_run_at: datetime | None = Field(description="when its action was last called")
    runs: list[ScheduleRunOut] = Field(
        default_factory=list, description=f"the last {RUNS_SHOWN} runs, newest first"
    )
