"""The manager's schedule routes: create, list, show and delete scheduled operations."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path

from qmotion.api.schedule import ScheduleCreate, ScheduleOut
from qmotion.server.automation.schedules import Schedules

# Schedule ids are the database's 64-bit integer keys.
ScheduleId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def install_routes(app: FastAPI, schedules: Schedules, auth: list[Any]) -> None:
    """The schedules' REST routes, behind the manager's ``auth`` dependencies."""

    @app.post("/v1/schedules", response_model=ScheduleOut, status_code=201, dependencies=auth)
    def create_schedule(req: ScheduleCreate) -> ScheduleOut:
        return schedules.create(req)

    @app.get("/v1/schedules", response_model=list[ScheduleOut], dependencies=auth)
    def list_schedules() -> list[ScheduleOut]:
        return schedules.list()

    @app.get("/v1/schedules/{schedule_id}", response_model=ScheduleOut, dependencies=auth)
    def get_schedule(schedule_id: ScheduleId) -> ScheduleOut:
        return schedules.get(schedule_id)

    @app.delete("/v1/schedules/{schedule_id}", status_code=204, dependencies=auth)
    def delete_schedule(schedule_id: ScheduleId) -> None:
        schedules.delete(schedule_id)
