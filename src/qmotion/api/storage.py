"""Storage vMotion on the wire: moving a running VM's disks to another datastore."""

from __future__ import annotations

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
MirrorPhase = Literal["mirroring", "ready", "switching", "pivoted", "released", "aborted", "failed"]


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


class DiskCopyRequest(StrictModel):
    uri: str = Field(pattern=r"^nbd://[0-9.]+:[0-9]+/[a-z0-9]+$")
    datastore: str = Field(min_length=1)
    path: str = Field(min_length=1)
    format: DiskFormat = "qcow2"


class DiskCopy(BaseModel):
    disk: Disk
    virtual_size: int
    allocated_bytes: int
