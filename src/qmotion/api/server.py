"""Wire models of the manager's API: hosts, VMs, tasks."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from ipaddress import IPv4Interface
from typing import Any, Literal

from pydantic import BaseModel, Field

from qmotion.api.host import HostFacts
from qmotion.api.migration import MigrationPhase, MigrationReport, MigrationStats
from qmotion.api.vm import NAME_PATTERN, MemoryMiB, StrictModel, VmState


class HostRegister(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    agent_url: str = Field(min_length=1)
    token: str = Field(min_length=16)


class HostOut(BaseModel):
    name: str
    agent_url: str
    state: Literal["up", "down", "maintenance"]
    last_seen: datetime | None
    vms: list[str]
    memory_mib: int
    committed_mib: int
    facts: HostFacts | None


class PoolSet(StrictModel):
    """The addresses VMs get when none is given (the lab registers its pool)."""

    first: str
    last: str
    prefixlen: int = Field(ge=8, le=30)


class Workload(StrictModel):
    fill_mib: int = Field(default=0, ge=0)
    dirty_mib_s: float = Field(default=0.0, ge=0)


class DiskCreate(StrictModel):
    datastore: str
    size_mib: int = Field(gt=0, le=1 << 20)


class VmCreate(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    host: str
    memory: MemoryMiB
    vcpus: int = Field(default=1, ge=1, le=64)
    workload: Workload | None = None
    address: IPv4Interface | None = None
    disk: DiskCreate | None = None
    start: bool = False


class VmOut(BaseModel):
    name: str
    uuid: str
    host: str
    state: VmState
    mac: str
    address: str | None
    cpu_model: str
    machine: str
    memory_mib: int
    vcpus: int
    migrating: bool = False


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (TaskState.QUEUED, TaskState.RUNNING)


class MigrateRequest(StrictModel):
    to: str
    max_downtime_ms: int | None = Field(default=None, ge=1, le=60_000)
    bandwidth: str | None = Field(default=None, description="e.g. 1gbit or 200M/s")


class TaskEventOut(BaseModel):
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] | None = None


class TaskOut(BaseModel):
    id: int
    kind: str
    state: TaskState
    vm: str | None
    source: str | None
    destination: str | None
    phase: MigrationPhase | None
    progress: float
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None
    result: MigrationReport | None
    stats: MigrationStats | None
    events: list[TaskEventOut] = Field(default_factory=list)
