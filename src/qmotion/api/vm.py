"""The VM specification (what a VM is) and its runtime view (where and how it runs)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface
from typing import Annotated, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from qmotion.api.sizes import parse_size

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def address_text(value: object) -> object:
    """Addresses are strings: pydantic would otherwise read JSON ``false`` or ``7`` as one."""
    if not isinstance(value, str | IPv4Address | IPv4Interface):
        raise ValueError("expected an IPv4 address as a string, e.g. 198.18.0.100")
    return value


Interface = Annotated[IPv4Interface, BeforeValidator(address_text)]


class StrictModel(BaseModel):
    """Unknown fields are refused: a typo in a spec must not silently become a default."""

    model_config = ConfigDict(extra="forbid")


def _to_mib(value: object) -> int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        size = parse_size(value, default_unit="M")
        if size % (1 << 20):
            raise ValueError("memory must be a whole number of MiB")
        return size >> 20
    raise ValueError("expected a size such as 512M or 1G")


MemoryMiB = Annotated[int, BeforeValidator(_to_mib), Field(ge=16, le=1 << 20)]


class KernelBoot(StrictModel):
    """Direct kernel boot. Without ``kernel``, the built qmotion test guest is used."""

    kind: Literal["kernel"] = "kernel"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""

    @model_validator(mode="after")
    def _initrd_needs_kernel(self) -> KernelBoot:
        if self.initrd and not self.kernel:
            raise ValueError("initrd given without kernel")
        return self


class DiskBoot(StrictModel):
    """Boot from the first disk marked bootable (or the first disk): a user's own guest."""

    kind: Literal["disk"] = "disk"


class GuestConfig(StrictModel):
    """Settings of the built test guest, passed on its kernel command line."""

    ip: Interface | None = None
    fill_mib: int = Field(default=0, ge=0, le=1 << 20)
    dirty_mib_s: float = Field(default=0.0, ge=0, le=100_000)
    hot_mib: int = Field(
        default=0,
        ge=0,
        le=1 << 20,
        description="first MiB of the fill rewritten with half the dirty rate (qmguest.c)",
    )
    check_s: float = Field(default=0.0, ge=0)
    disk_rate: float = Field(default=20.0, gt=0, le=10_000)
    disk_bulk_mib_s: float = Field(
        default=0.0, ge=0, le=10_000, description="MiB/s written to the disk's second half"
    )
    cpu_pct: float = Field(default=0.0, ge=0, le=100, description="% of a vCPU kept busy")

    @model_validator(mode="after")
    def _hot_within_fill(self) -> GuestConfig:
        if self.hot_mib > self.fill_mib:
            raise ValueError(f"hot_mib ({self.hot_mib}) must not exceed fill_mib ({self.fill_mib})")
        return self


class Nic(StrictModel):
    mac: str
    bridge: str = Field(default="vmbr0", min_length=1, max_length=15)
    model: Literal["virtio-net-pci", "e1000"] = "virtio-net-pci"

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not _MAC.match(v):
            raise ValueError(f"not a MAC address: {v!r}")
        if int(v[:2], 16) & 1:
            raise ValueError(f"{v} is a multicast address; a NIC needs a unicast MAC")
        return v


class CloudInit(StrictModel):
    """What a user's own guest learns at first boot from a NoCloud seed (cloud-init reads a
    disk labelled ``cidata``): its name, and its address on the NIC with its MAC."""

    hostname: str = Field(pattern=NAME_PATTERN)
    address: Interface | None = None
    user_data: str = Field(
        default="", max_length=16384, description="extra #cloud-config lines, appended"
    )


class Disk(StrictModel):
    datastore: str = Field(min_length=1)
    path: str = Field(min_length=1, description="path relative to the datastore's root")
    format: Literal["qcow2", "raw"] = "qcow2"
    create_size: int | None = Field(
        default=None, gt=0, description="bytes; create the image with this size if absent"
    )
    create_from: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]+:[A-Za-z0-9._/-]+$",
        description="DATASTORE:PATH of a library image: if absent, the disk is made as a full "
        "copy of it (grown to create_size)",
    )
    bootable: bool = False

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("must be relative to the datastore and must not contain '..'")
        return v

    @field_validator("create_from")
    @classmethod
    def _image_inside(cls, v: str | None) -> str | None:
        if v is not None and ".." in v.partition(":")[2].split("/"):
            raise ValueError("must name a file inside the datastore (no '..')")
        return v


class VmSpec(StrictModel):
    """Everything needed to run a VM on any host that has its bridges and datastores."""

    name: str = Field(pattern=NAME_PATTERN)
    uuid: UUID = Field(default_factory=uuid4)
    memory: MemoryMiB = Field(description="MiB; accepts sizes such as 512M or 1G")
    vcpus: int = Field(default=1, ge=1, le=64)
    cpu_model: str = Field(default="qemu64", min_length=1)
    machine: str = Field(default="pc", min_length=1)
    boot: KernelBoot | DiskBoot = Field(default_factory=KernelBoot, discriminator="kind")
    nics: list[Nic] = Field(default_factory=list, max_length=8)
    disks: list[Disk] = Field(default_factory=list, max_length=16)
    guest: GuestConfig | None = None
    cloud_init: CloudInit | None = Field(
        default=None, description="a NoCloud seed attached as a CD-ROM (user's own guests)"
    )
    saved_state: Disk | None = Field(
        default=None,
        description="a suspended VM's memory and device state (raw file on a datastore); "
        "its next start resumes from it",
    )

    @model_validator(mode="after")
    def _consistent(self) -> VmSpec:
        if isinstance(self.boot, DiskBoot) and not self.disks:
            raise ValueError("boot.kind is 'disk' but the VM has no disks")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValueError("two NICs share a MAC address")
        return self


class VmState(StrEnum):
    """A VM as its host sees it (the manager keeps the last one it saw)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"
    SUSPENDED = "suspended"  # not running; its state saved to a datastore (vm suspend)


MemoryBacking = Literal["hugepages", "anonymous"]


class VmInfo(BaseModel):
    """A VM as one host's agent sees it."""

    name: str
    uuid: UUID
    host: str
    state: VmState
    qemu_status: str | None = None
    pid: int | None = None
    accel: str | None = None
    started_at: datetime | None = None
    spec: VmSpec
    taps: list[str] = Field(default_factory=list)
    memory_backing: MemoryBacking | None = Field(
        default=None, description="hugepages (from the host's pool) or anonymous"
    )
    incoming_migration: str | None = Field(
        default=None, description="the migration it arrived by, until the manager confirmed it"
    )
    outgoing_migration: str | None = Field(
        default=None, description="its last outgoing migration's id"
    )
    outgoing_status: str | None = Field(
        default=None,
        description="that migration's QEMU status (completed only with QEMU in postmigrate)",
    )


class StopRequest(StrictModel):
    force: bool = False
    timeout_s: float = Field(default=30.0, ge=0, le=3600)
