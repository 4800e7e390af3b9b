"""Wire models of the manager's API: hosts, VMs, tasks."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qmotion.api.drs import OperationReport, Placement
from qmotion.api.host import HostFacts
from qmotion.api.migration import (
    DestinationStart,
    MigrationPhase,
    MigrationReport,
    MigrationStats,
)
from qmotion.api.storage import DiskFormat, DiskUsage, MirrorStatus
from qmotion.api.vm import NAME_PATTERN, Interface, MemoryMiB, StrictModel, VmState, address_text

_HTTP_URL = TypeAdapter(HttpUrl)


def _http_url(value: str) -> str:
    """An http or https URL with a host and a valid port (kept as written)."""
    try:
        _HTTP_URL.validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None
    return value


Address = Annotated[IPv4Address, BeforeValidator(address_text)]
AgentUrl = Annotated[str, AfterValidator(_http_url)]


class HostRegister(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    agent_url: AgentUrl = Field(pattern=r"^https?://", description="e.g. http://h1:7100")
    # Sent in an HTTP header: printable ASCII without spaces.
    token: str = Field(min_length=16, pattern=r"^[!-~]+$")


class HostOut(BaseModel):
    name: str
    agent_url: str
    state: Literal["up", "down", "maintenance", "entering-maintenance"]
    last_seen: datetime | None
    vms: list[str]
    memory_mib: int
    committed_mib: int
    facts: HostFacts | None
    maintenance_reason: str | None = Field(
        default=None, description="why a host entering maintenance is not empty yet"
    )


class PoolSet(StrictModel):
    """The addresses VMs get when none is given (the lab registers its pool)."""

    first: Address = Field(description="first address of the pool")
    last: Address = Field(description="last address of the pool (inclusive)")
    prefixlen: int = Field(ge=8, le=30, description="prefix length the VMs' addresses get")


class Workload(StrictModel):
    """What the test guest's memory workload does (see qmguest.c)."""

    fill_mib: int = Field(default=0, ge=0, description="MiB written with checkable pages at boot")
    dirty_mib_s: float = Field(default=0.0, ge=0, description="MiB/s rewritten after the fill")
    hot_mib: int = Field(
        default=0,
        ge=0,
        description=(
            "MiB of hot set: the first hot_mib MiB of the fill are rewritten over and over with"
            " half of dirty_mib_s (a busy VM's working set), the other half sweeps the rest of"
            " the fill in page order; 0: the whole rate sweeps. At most fill_mib; hot_mib ="
            " fill_mib puts the whole rate on the hot set."
        ),
    )

    cpu_pct: float = Field(
        default=0.0, ge=0, le=100, description="% of one vCPU the guest keeps busy (CPU demand)"
    )
    disk_mib_s: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="MiB/s the guest writes to the second half of its first disk (1 MiB direct "
        "writes), besides the checked records in the first half",
    )

    @field_validator("hot_mib")
    @classmethod
    def _hot_within_fill(cls, v: int, info: ValidationInfo) -> int:
        fill = info.data.get("fill_mib")
        if fill is not None and v > fill:
            raise ValueError(
                f"hot_mib ({v}) must not exceed fill_mib ({fill}):"
                " the hot set is the first hot_mib MiB of the fill"
            )
        return v


class DiskCreate(StrictModel):
    datastore: str
    size_mib: int | None = Field(
        default=None, gt=0, le=1 << 24, description="required without an image; default: its size"
    )
    format: DiskFormat = "qcow2"


class ImageImport(StrictModel):
    """A disk image file on a host that reaches ``datastore``, into the image library."""

    file: str = Field(min_length=1, max_length=4096, description="absolute path on that host")
    name: str = Field(pattern=NAME_PATTERN)
    datastore: str | None = Field(
        default=None, max_length=64, description="default: the first datastore shared by hosts"
    )


class ImageOut(BaseModel):
    name: str
    datastore: str
    path: str
    format: DiskFormat
    virtual_size: int
    allocated_bytes: int
    source: str = Field(description="the file it was imported from")
    host: str = Field(description="the host whose agent checked and copied it")
    created_at: datetime


class VmCreate(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    host: str | None = Field(
        default=None, description="default: the host DRS picks (rules, capacity, balance)"
    )
    force: bool = Field(default=False, description="create on host even if a must rule forbids it")
    memory: MemoryMiB
    vcpus: int = Field(default=1, ge=1, le=64)
    workload: Workload | None = None
    address: Interface | None = None
    disk: DiskCreate | None = None
    extra_disks: list[DiskCreate] = Field(
        default_factory=list, max_length=15, description="empty disks after the first"
    )
    image: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="boot from a full copy of this library image on disk.datastore",
    )
    user_data: str | None = Field(
        default=None,
        max_length=16384,
        description="with an image: #cloud-config lines added to its cloud-init seed",
    )
    start: bool = False

    @model_validator(mode="after")
    def _disk_for_image(self) -> VmCreate:
        if self.image is not None and self.disk is None:
            raise ValueError("an image needs disk.datastore: where the VM's copy goes")
        if self.image is None and self.disk is not None and self.disk.size_mib is None:
            raise ValueError("disk.size_mib is required without an image")
        if self.image is not None and self.workload is not None:
            raise ValueError("workload drives the built test guest, not a VM from an image")
        if self.image is None and self.user_data is not None:
            raise ValueError("user_data is cloud-init's: it goes with an image")
        if self.user_data is not None:
            try:
                parsed = yaml.safe_load(self.user_data)
            except yaml.YAMLError as exc:
                raise ValueError(f"user_data is not YAML: {exc}") from exc
            if not isinstance(parsed, dict):
                raise ValueError("user_data must be #cloud-config keys (a YAML mapping)")
        for i, d in enumerate(self.extra_disks):
            if d.size_mib is None:
                raise ValueError(f"extra_disks[{i}].size_mib is required")
        if self.extra_disks and self.disk is None:
            raise ValueError("extra_disks come after a first disk (disk)")
        return self


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
    attention: str | None = Field(
        default=None,
        description="why the VM needs an operator (found by reconcile or a migration); "
        "migrations and delete --force are refused until it is resolved",
    )
    disks: list[DiskUsage] = Field(default_factory=list)
    placement: Placement | None = Field(
        default=None, description="at creation: why this host (DRS's ranking)"
    )


class ResolveRequest(StrictModel):
    """An operator's word on a VM that needs attention (``vm resolve``)."""

    keep: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="the host whose copy is the VM: every other host's copy is removed and "
        "the inventory takes this one; without it, the mark goes only if no other host holds "
        "a copy",
    )


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
    to: str | None = Field(
        default=None, description="destination host; without it, the VM stays on its host"
    )
    datastore: str | None = Field(
        default=None,
        description="move every disk to this datastore while the VM runs (Storage vMotion)",
    )
    disk_format: DiskFormat | None = Field(
        default=None, description="format of the moved disks; default: each keeps its own"
    )
    max_downtime_ms: int | None = Field(default=None, ge=1, le=60_000)
    bandwidth: str | None = Field(default=None, description="e.g. 1gbit or 200M/s")
    timeout_s: float | None = Field(
        default=None,
        ge=10,
        le=7 * 86400,
        description="abort (source kept running) if not complete by then; default 120 s/GiB",
    )
    force: bool = Field(
        default=False, description="migrate even if a must placement rule forbids it"
    )
    destination_start: DestinationStart = Field(
        default="paused",
        description="paused (default): the destination starts paused and runs only once the "
        "source completed; auto: QEMU runs it by itself (unsafe: for measurement only)",
    )
    priority: Literal["high", "normal"] | None = Field(
        default=None,
        description="high: starts before every normal move waiting for the same hosts' "
        "migration slots (never before a move already holding one of them); unset: normal",
    )
    allow_postcopy: bool = Field(
        default=False,
        description="when pre-copy cannot converge, switch to postcopy: the VM then runs on "
        "the destination while its remaining memory follows; a broken link pauses it there "
        "until the stream is recovered (the source's copy is kept until then)",
    )

    @model_validator(mode="after")
    def _somewhere(self) -> MigrateRequest:
        if self.to is None and self.datastore is None:
            raise ValueError("give a destination host (to), a datastore, or both")
        if self.disk_format is not None and self.datastore is None:
            raise ValueError("disk_format applies to moved disks: give a datastore too")
        if self.to is None:
            live_only = [
                name
                for name, value in (
                    ("max_downtime_ms", self.max_downtime_ms),
                    ("timeout_s", self.timeout_s),
                    ("allow_postcopy", self.allow_postcopy or None),
                )
                if value is not None
            ]
            if live_only:
                raise ValueError(
                    f"{', '.join(live_only)} apply to a live migration to another host (to); "
                    "a storage move takes datastore, disk_format and bandwidth"
                )
        return self


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
    mirror: MirrorStatus | None = Field(
        default=None, description="a storage move's copy: per-disk progress, copy mode"
    )
    operation: OperationReport | None = Field(
        default=None, description="a DRS operation's (apply, maintenance): each VM's move"
    )
    events: list[TaskEventOut] = Field(default_factory=list)
