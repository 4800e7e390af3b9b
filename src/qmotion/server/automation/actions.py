"""The manager's actions as the API, the console and schedules start them: one place each."""

from __future__ import annotations

import asyncio

from qmotion.api.server import MigrateRequest, TaskOut
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.maintenance import Maintenance
from qmotion.server.errors import Conflict
from qmotion.server.tasks.runner import TaskRunner


class ManagerActions:
    """What a route, a console form and a schedule run: the same checks in the same order."""

    def __init__(self, runner: TaskRunner, drs: ClusterDrs, maintenance: Maintenance) -> None:
        self.runner, self.cluster, self.maintenance = runner, drs, maintenance

    async def submit_migration(self, vm: str, req: MigrateRequest) -> TaskOut:
        """Any move of a VM (live, storage, shared-nothing, cold); a target host is checked
        against the must rules first (409 ``rule_violation``) unless ``force``."""
        if req.to is not None and not req.force:
            await asyncio.to_thread(self.cluster.config.check_move, vm, req.to)
        return await self.runner.submit_migration(vm, req)

    async def migrate(self, vm: str, to: str) -> int:
        return (await self.submit_migration(vm, MigrateRequest(to=to))).id

    async def drs(self) -> int:
        return (await self.cluster.run_and_apply()).id

    async def maintenance_enter(self, host: str) -> int:
        if self.maintenance.status(host).state == "maintenance":
            raise Conflict(f"host {host} is in maintenance already", host=host)
        out = self.maintenance.enter(host)
        assert out.task_id is not None  # an evacuation task, started or under way
        return out.task_id

    async def maintenance_exit(self, host: str) -> int:
        out = self.maintenance.exit(host, return_vms=True)
        assert out.task_id is not None  # exit is always a task
        return out.task_id
