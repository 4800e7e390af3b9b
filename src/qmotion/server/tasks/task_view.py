"""A persisted task as the API shows it, and the kinds of tasks."""

from __future__ import annotations

from qmotion.api.drs import OperationReport
from qmotion.api.migration import MigrationReport, MigrationStats
from qmotion.api.server import TaskEventOut, TaskOut
from qmotion.api.storage import MirrorStatus
from qmotion.server.db import Task

MIGRATE = "migrate"
STORAGE_MOVE = "storage-move"
COLD_MIGRATE = "cold-migrate"
# DRS operations: their result is an OperationReport (api.drs), not a migration report.
DRS_APPLY = "drs-apply"
MAINTENANCE = "maintenance"
MAINTENANCE_EXIT = "maintenance-exit"
OPERATION_KINDS = (DRS_APPLY, MAINTENANCE, MAINTENANCE_EXIT)


def task_out(t: Task, with_events: bool = True) -> TaskOut:
    storage_task = t.kind == STORAGE_MOVE
    operation = t.kind in OPERATION_KINDS
    return TaskOut(
        id=t.id,
        kind=t.kind,
        state=t.state,
        vm=t.vm,
        source=t.source,
        destination=t.destination,
        phase=t.phase,
        progress=t.progress,
        created_at=t.created_at,
        started_at=t.started_at,
        ended_at=t.ended_at,
        error=t.error,
        result=MigrationReport.model_validate(t.result) if t.result and not operation else None,
        operation=OperationReport.model_validate(t.result) if t.result and operation else None,
        # A shared-nothing migration has a mirror before QEMU's migration has any status.
        stats=MigrationStats.model_validate(t.stats)
        if t.stats and not storage_task and "status" in t.stats
        else None,
        mirror=MirrorStatus.model_validate(t.stats)
        if t.stats and storage_task
        else MirrorStatus.model_validate(t.stats["mirror"])
        if t.stats and t.stats.get("mirror")
        else None,
        events=[
            TaskEventOut(at=e.at, kind=e.kind, message=e.message, data=e.data) for e in t.events
        ]
        if with_events
        else [],
    )
