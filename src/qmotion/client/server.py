"""Typed client of the manager's API: what the CLI (and any UI) uses, and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from qmotion.api.drs import (
    ApplyRequest,
    DrsRunOut,
    DrsSettings,
    DrsState,
    MaintenanceExit,
    MaintenanceOut,
    MigrationTarget,
    PlacementCandidate,
    RecommendationOut,
    RuleCreate,
    RuleOut,
    SettingsSet,
)
from qmotion.api.enrol import CertRotation, JoinTokenCreate, JoinTokenOut
from qmotion.api.migration import MigrationPrediction
from qmotion.api.schedule import ScheduleCreate, ScheduleOut
from qmotion.api.server import (
    HostOut,
    HostRegister,
    ImageImport,
    ImageOut,
    MigrateRequest,
    PoolSet,
    ResolveRequest,
    TaskOut,
    VmCreate,
    VmOut,
)
from qmotion.api.vm import StopRequest
from qmotion.client.access import AccessCalls
from qmotion.client.base import dump
from qmotion.client.paging import Page, get_page

UPLOAD_CHUNK = 1 << 20


class ServerClient(AccessCalls):
    def register_host(self, req: HostRegister) -> HostOut:
        return self.call(HostOut, "POST", "/v1/hosts", json=dump(req))

    def create_join_token(self, req: JoinTokenCreate) -> JoinTokenOut:
        return self.call(JoinTokenOut, "POST", "/v1/hosts/join-tokens", json=dump(req))

    def rotate_certs(self) -> list[CertRotation]:
        # One host after another, up to 30 s each: more than the default timeout.
        return self.call(
            list[CertRotation],
            "POST",
            "/v1/cluster/rotate-certs",
            timeout=httpx.Timeout(1800.0, connect=10.0),
        )

    def remove_host(self, name: str) -> None:
        self.request("DELETE", f"/v1/hosts/{name}")

    def hosts(self) -> list[HostOut]:
        return self.call(list[HostOut], "GET", "/v1/hosts")

    def refresh_hosts(self) -> list[HostOut]:
        return self.call(list[HostOut], "POST", "/v1/hosts/refresh")

    def set_pool(self, pool: PoolSet) -> None:
        self.request("PUT", "/v1/pool", json=dump(pool))

    def vms(self, *, limit: int | None = None, after: str | None = None) -> list[VmOut]:
        """By name; all of them unless ``limit``."""
        return self.vm_page(limit=limit, after=after).items

    def vm_page(self, *, limit: int | None = None, after: str | None = None) -> Page[VmOut]:
        """VMs by name after ``after``; ``next_after`` continues the list."""
        return get_page(self, VmOut, "/v1/vms", limit=limit, after=after)

    def images(self) -> list[ImageOut]:
        return self.call(list[ImageOut], "GET", "/v1/images")

    def upload_image(
        self,
        file: Path,
        name: str,
        datastore: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ImageOut:
        """Stream a local image file to the manager (and through it to a host), calling
        ``progress`` with the bytes sent so far."""

        def chunks() -> Iterator[bytes]:
            sent = 0
            with file.open("rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(sent)

        params = {"datastore": datastore} if datastore else {}
        headers = {"Content-Type": "application/octet-stream"}
        return self.call(
            ImageOut,
            "PUT",
            f"/v1/images/{name}/upload",
            params=params,
            content=chunks(),
            headers=headers,
            timeout=httpx.Timeout(3600.0, connect=10.0),
        )

    def import_image(self, req: ImageImport) -> ImageOut:
        return self.call(ImageOut, "POST", "/v1/images", json=dump(req))

    def create_vm(self, req: VmCreate) -> VmOut:
        return self.call(VmOut, "POST", "/v1/vms", json=dump(req))

    def vm(self, name: str) -> VmOut:
        return self.call(VmOut, "GET", f"/v1/vms/{name}")

    def start_vm(self, name: str) -> VmOut:
        return self.call(VmOut, "POST", f"/v1/vms/{name}/start")

    def suspend_vm(self, name: str) -> VmOut:
        return self.call(VmOut, "POST", f"/v1/vms/{name}/suspend")

    def stop_vm(self, name: str, *, force: bool = False) -> VmOut:
        return self.call(VmOut, "POST", f"/v1/vms/{name}/stop", json=dump(StopRequest(force=force)))

    def resolve_vm(self, name: str, *, keep: str | None = None) -> VmOut:
        """Clear a VM's attention mark; with ``keep``, that host's copy is the VM and every
        other copy is removed."""
        req = ResolveRequest(keep=keep)
        return self.call(VmOut, "POST", f"/v1/vms/{name}/resolve", json=dump(req))

    def delete_vm(self, name: str, *, force: bool = False) -> None:
        self.request("DELETE", f"/v1/vms/{name}", params={"force": str(force).lower()})

    def migrate(self, name: str, req: MigrateRequest) -> TaskOut:
        return self.call(TaskOut, "POST", f"/v1/vms/{name}/migrate", json=dump(req))

    def plan_migration(self, name: str, req: MigrateRequest) -> MigrationPrediction:
        return self.call(
            MigrationPrediction, "POST", f"/v1/vms/{name}/migrate/plan", json=dump(req)
        )

    def migration_targets(self, vm: str, datastore: str | None = None) -> list[MigrationTarget]:
        """Every host ranked for moving ``vm`` (its disks to ``datastore`` too), with what a
        submission would refuse; changes nothing."""
        params = {} if datastore is None else {"datastore": datastore}
        return self.call(
            list[MigrationTarget], "GET", f"/v1/vms/{vm}/migrate/targets", params=params
        )

    def tasks(self, *, limit: int | None = None, after: int | None = None) -> list[TaskOut]:
        """Newest first; the manager's default page (100) unless ``limit``."""
        return self.task_page(limit=limit, after=after).items

    def task_page(self, *, limit: int | None = None, after: int | None = None) -> Page[TaskOut]:
        """Tasks older than task ``after``, newest first; ``next_after`` continues the list."""
        return get_page(self, TaskOut, "/v1/tasks", limit=limit, after=after)

    def task(self, task_id: int) -> TaskOut:
        return self.call(TaskOut, "GET", f"/v1/tasks/{task_id}")

    def cancel_task(self, task_id: int) -> TaskOut:
        return self.call(TaskOut, "POST", f"/v1/tasks/{task_id}/cancel")

    def schedules(self) -> list[ScheduleOut]:
        return self.call(list[ScheduleOut], "GET", "/v1/schedules")

    def schedule(self, schedule_id: int) -> ScheduleOut:
        return self.call(ScheduleOut, "GET", f"/v1/schedules/{schedule_id}")

    def create_schedule(self, req: ScheduleCreate) -> ScheduleOut:
        return self.call(ScheduleOut, "POST", "/v1/schedules", json=dump(req))

    def delete_schedule(self, schedule_id: int) -> None:
        self.request("DELETE", f"/v1/schedules/{schedule_id}")

    # DRS: cluster settings, rules, recommendations, placement, maintenance.

    def settings(self) -> DrsSettings:
        return self.call(DrsSettings, "GET", "/v1/cluster/settings")

    def set_settings(self, values: dict[str, str]) -> DrsSettings:
        return self.call(
            DrsSettings, "PUT", "/v1/cluster/settings", json=dump(SettingsSet(values=values))
        )

    def rules(self) -> list[RuleOut]:
        return self.call(list[RuleOut], "GET", "/v1/rules")

    def rule(self, name: str) -> RuleOut:
        return self.call(RuleOut, "GET", f"/v1/rules/{name}")

    def create_rule(self, req: RuleCreate) -> RuleOut:
        return self.call(RuleOut, "POST", "/v1/rules", json=dump(req))

    def delete_rule(self, name: str) -> None:
        self.request("DELETE", f"/v1/rules/{name}")

    def drs_state(self) -> DrsState:
        return self.call(DrsState, "GET", "/v1/drs/state")

    def drs_run(self) -> DrsRunOut:
        return self.call(DrsRunOut, "POST", "/v1/drs/run")

    def recommendations(self, *, all_states: bool = False) -> list[RecommendationOut]:
        return self.call(
            list[RecommendationOut],
            "GET",
            "/v1/drs/recommendations",
            params={"all": str(all_states).lower()},
        )

    def drs_apply(self, req: ApplyRequest) -> TaskOut:
        return self.call(TaskOut, "POST", "/v1/drs/apply", json=dump(req))

    def place(self, memory_mib: int, vcpus: int = 1) -> list[PlacementCandidate]:
        body = {"memory": f"{memory_mib}M", "vcpus": vcpus}
        return self.call(list[PlacementCandidate], "POST", "/v1/drs/place", json=body)

    def maintenance(self, host: str) -> MaintenanceOut:
        return self.call(MaintenanceOut, "GET", f"/v1/hosts/{host}/maintenance")

    def enter_maintenance(self, host: str) -> MaintenanceOut:
        return self.call(MaintenanceOut, "POST", f"/v1/hosts/{host}/maintenance")

    def exit_maintenance(self, host: str, *, return_vms: bool = False) -> MaintenanceOut:
        req = MaintenanceExit(return_vms=return_vms)
        return self.call(
            MaintenanceOut, "POST", f"/v1/hosts/{host}/maintenance/exit", json=dump(req)
        )
