"""Storage vMotion on the wire: moving a running VM's disks to another datastore."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Literal

from pydantic import BaseModel, Field

from qmotion.api.vm import Disk, StrictModel

DiskFormat = Literal["qcow2", "raw"]
CopyMode = Literal["background", "write-blocking"]
# What the agent's mirror of one VM is doing, as a whole:
#   mirroring  jobs copying; ready: every job in sync (pivot now is short)
#   switching  the agent was finalizing the jobs (QEMU switches a disk at its finalize); the
#              agent settles it from what QEMU runs on; unknown while QEMU does not answer
#   pivoted    the VM runs on the targets, its definition names them; old files not yet removed
#   released   old files removed (the move is over)
#   aborted    jobs cancelled, targets removed: the VM runs on its old disks
#   failed     a job failed (its error is given); the VM runs on its old disks until aborted
#   completed  (shared-nothing) the mirrors ended in sync at switchover, nothing pivoted here
MirrorPhase = Literal[
    "mirroring", "ready", "switching", "pivoted", "released", "aborted", "failed", "completed"
]


class MirrorRequest(StrictModel):
    """Mirror every disk of a running VM to ``datastore``."""

    datastore: str = Field(min_length=1)
    format: DiskFormat | None = Field(
        default=None, description="format of the new disks; default: each disk keeps its own"
    )
    speed: int | None = Field(
        default=None, gt=0, description="bytes/s the copy may use (QEMU's job speed); none: all"
    )


class DiskMirror(BaseModel):
    """One disk's copy: QEMU's job, where it copies from and to, how far it got."""

    index: int
    job: str
    source: Disk
    target: Disk
    status: str = Field(description="QEMU's job status: running, ready, pending, concluded...")
    offset: int = 0
    length: int = 0
    ready: bool = False
    actively_synced: bool = False
    error: str | None = None


class MirrorStatus(BaseModel):
    vm: str
    phase: MirrorPhase
    datastore: str
    copy_mode: CopyMode = "background"
    disks: list[DiskMirror] = Field(default_factory=list)
    total_bytes: int = Field(default=0, description="sum of the jobs' lengths (they grow)")
    remaining_bytes: int = 0
    rate_bps: float = Field(default=0.0, description="bytes/s copied since the last query")
    error: str | None = None
    removed: list[str] = Field(default_factory=list, description="files the agent deleted")
    leftovers: list[str] = Field(
        default_factory=list, description="files it could not delete (named for the operator)"
    )

    @property
    def synced(self) -> bool:
        """Every job is in sync and guest writes reach both copies before they complete."""
        return bool(self.disks) and all(
            d.ready and (self.copy_mode == "write-blocking") for d in self.disks
        )


class DiskUsage(BaseModel):
    """A VM's disk as ``vm show`` lists it."""

    index: int
    datastore: str
    path: str
    format: DiskFormat
    virtual_size: int | None = Field(default=None, description="bytes the guest sees")
    allocated_bytes: int | None = Field(default=None, description="bytes the file occupies")


class DiskExport(BaseModel):
    index: int
    uri: str
    format: DiskFormat
    virtual_size: int
    tls: bool = Field(
        default=False, description="served over TLS: only a host of the cluster CA reads it"
    )


class DiskCopyRequest(StrictModel):
    uri: str = Field(pattern=r"^nbd://[0-9.]+:[0-9]+/[a-z0-9]+$")
    datastore: str = Field(min_length=1)
    path: str = Field(min_length=1)
    format: DiskFormat = "qcow2"
    tls: bool = Field(
        default=False, description="the export is TLS: read it with this host's certificate"
    )


class DiskCopy(BaseModel):
    disk: Disk
    virtual_size: int
    allocated_bytes: int


# ---------------------------------------------------------------- images


class ImageImportRequest(StrictModel):
    """Check a disk image file on the agent's host and copy it into a datastore's library."""

    file: str = Field(min_length=1, max_length=4096, description="absolute path on the host")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    datastore: str = Field(min_length=1, max_length=64)


class ImageInfo(BaseModel):
    datastore: str
    path: str = Field(description="relative to the datastore's root")
    format: DiskFormat
    virtual_size: int
    allocated_bytes: int


# ---------------------------------------------------------------- shared-nothing live migration


class CopyDisk(StrictModel):
    """A disk the destination creates empty for the source to mirror into."""

    index: int = Field(ge=0, le=31)
    virtual_size: int = Field(gt=0, le=1 << 50)
    allocated_bytes: int = Field(default=0, ge=0, le=1 << 50)


class DiskCopyPlan(StrictModel):
    """The disks a shared-nothing live migration copies, and where to."""

    datastore: str = Field(min_length=1, max_length=64)
    format: DiskFormat | None = Field(default=None, description="default: each keeps its own")
    disks: list[CopyDisk] = Field(min_length=1, max_length=32)


class NbdExport(StrictModel):
    index: int = Field(ge=0, le=31)
    name: str = Field(pattern=r"^[a-z0-9-]{1,32}$")


class NbdTargets(BaseModel):
    """Where the destination serves the empty disks (writable NBD exports of its QEMU)."""

    host: str
    port: int
    exports: list[NbdExport]
    disks: list[Disk] = Field(description="the destination's definition of every disk")


class NbdMirrorRequest(StrictModel):
    """Mirror the VM's disks into the destination's NBD exports (source agent)."""

    host: IPv4Address
    port: int = Field(ge=1, le=65535)
    exports: list[NbdExport] = Field(min_length=1, max_length=32)
    targets: list[Disk] = Field(
        default_factory=list, description="the destination's disks, by export (for progress)"
    )
    tls: bool = False
    tls_hostname: str | None = Field(default=None, max_length=253)
    speed: int | None = Field(default=None, gt=0, description="bytes/s per disk; none: all")
