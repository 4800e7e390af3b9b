"""The manager's DRS routes: cluster settings, rules, recommendations, placement, maintenance."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import Field

from qmotion.api.drs import (
    ApplyRequest,
    DrsRunOut,
    DrsSettings,
    DrsState,
    MaintenanceExit,
    MaintenanceOut,
    PlacementCandidate,
    RecommendationOut,
    RuleCreate,
    RuleOut,
    SettingsSet,
)
from qmotion.api.server import TaskOut
from qmotion.api.vm import NAME_PATTERN, MemoryMiB, StrictModel
from qmotion.drs.model import VmSpec
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.maintenance import Maintenance


class PlaceRequest(StrictModel):
    """A VM to be created, as placement sees it."""

    name: str = Field(default="new-vm", pattern=NAME_PATTERN)
    memory: MemoryMiB
    vcpus: int = Field(default=1, ge=1, le=64)


def install_drs_routes(
    app: FastAPI, drs: ClusterDrs, maintenance: Maintenance, auth: list[Any]
) -> None:
    @app.get("/v1/cluster/settings", response_model=DrsSettings, dependencies=auth)
    def get_settings() -> DrsSettings:
        return drs.config.settings()

    @app.put("/v1/cluster/settings", response_model=DrsSettings, dependencies=auth)
    def set_settings(req: SettingsSet) -> DrsSettings:
        return drs.config.set_settings(req)

    @app.get("/v1/rules", response_model=list[RuleOut], dependencies=auth)
    def list_rules() -> list[RuleOut]:
        return drs.config.list_rules()

    @app.post("/v1/rules", response_model=RuleOut, status_code=201, dependencies=auth)
    def create_rule(req: RuleCreate) -> RuleOut:
        return drs.config.create_rule(req)

    @app.get("/v1/rules/{name}", response_model=RuleOut, dependencies=auth)
    def show_rule(name: str) -> RuleOut:
        return drs.config.get_rule(name)

    @app.delete("/v1/rules/{name}", status_code=204, dependencies=auth)
    def delete_rule(name: str) -> None:
        drs.config.delete_rule(name)

    @app.post(
        "/v1/drs/run",
        response_model=DrsRunOut,
        dependencies=auth,
        summary="Plan on the live inventory; store the moves as recommendations",
    )
    async def drs_run() -> DrsRunOut:
        return await drs.tick()

    @app.get("/v1/drs/state", response_model=DrsState, dependencies=auth)
    def drs_state() -> DrsState:
        return drs.state()

    @app.get("/v1/drs/recommendations", response_model=list[RecommendationOut], dependencies=auth)
    def recommendations(all: bool = False) -> list[RecommendationOut]:
        return drs.recommendations(all_states=all)

    @app.post("/v1/drs/apply", response_model=TaskOut, status_code=202, dependencies=auth)
    async def drs_apply(req: ApplyRequest) -> TaskOut:
        return drs.apply(req)  # on the loop: it starts the operation's task

    @app.post("/v1/drs/place", response_model=list[PlacementCandidate], dependencies=auth)
    def drs_place(req: PlaceRequest) -> list[PlacementCandidate]:
        spec = VmSpec(name=req.name, host="-", memory_mib=req.memory, vcpus=req.vcpus)
        return drs.placement(spec)

    @app.get("/v1/hosts/{name}/maintenance", response_model=MaintenanceOut, dependencies=auth)
    def maintenance_status(name: str) -> MaintenanceOut:
        return maintenance.status(name)

    @app.post(
        "/v1/hosts/{name}/maintenance",
        response_model=MaintenanceOut,
        status_code=202,
        dependencies=auth,
        summary="Enter maintenance: take no new VMs, evacuate the running ones",
    )
    async def maintenance_enter(name: str) -> MaintenanceOut:
        return maintenance.enter(name)

    @app.post("/v1/hosts/{name}/maintenance/exit", response_model=MaintenanceOut, dependencies=auth)
    async def maintenance_exit(name: str, req: MaintenanceExit | None = None) -> MaintenanceOut:
        return maintenance.exit(name, return_vms=(req or MaintenanceExit()).return_vms)
