"""What a host agent reports about its machine: facts (static) and metrics (sampled)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class AccelInfo(BaseModel):
    """The accelerator VMs run under here, and why: the choice is reported, never silent."""

    name: Literal["kvm", "tcg"]
    reason: str
    probed_at: datetime | None = None


class Datastore(BaseModel):
    name: str
    path: str
    shared: bool


class MigrationNetwork(BaseModel):
    """One address a host receives migrations on, and the interface that carries it."""

    address: str
    prefixlen: int
    ifname: str | None = None
    mtu: int | None = Field(default=None, description="of the interface holding the address")
    role: Literal["migration", "management"] = "migration"


class HostFacts(BaseModel):
    name: str
    address: str | None = None
    cpu_model: str
    cpu_flags: list[str]
    cpus: int
    memory_bytes: int
    qemu_version: str
    machine_types: list[str]
    machine_aliases: dict[str, str] = Field(default_factory=dict)
    cpu_models: list[str]
    accel: AccelInfo
    bridges: list[str]
    datastores: list[Datastore]
    agent_version: str
    migration_networks: list[MigrationNetwork] = Field(
        default_factory=list,
        description="addresses to receive migrations on, preferred first (management last)",
    )
    tcp_rmem_max: int | None = Field(
        default=None, description="bytes: the TCP receive window one stream may grow to"
    )
    peer_port: int | None = Field(
        default=None, description="mutual-TLS port for other agents (None: not set up yet)"
    )
    cert_not_after: datetime | None = Field(
        default=None,
        description="when this host's certificate ends (`qmotion cluster rotate-certs` renews)",
    )
    health: Literal["ok", "degraded"] = Field(
        default="ok", description="degraded: something VMs rely on is failing (see reasons)"
    )
    health_reasons: list[str] = Field(default_factory=list)


class VmMetrics(BaseModel):
    name: str
    cpu_percent: float
    rss_bytes: int
    memory_mib: int
    dirty_rate_mib_s: float | None = Field(
        default=None, description="last periodic QMP calc-dirty-rate (None: not measured yet)"
    )


class HostMetrics(BaseModel):
    sampled_at: datetime
    cpus: int
    cpu_percent: float = Field(description="whole host, 100 = all CPUs busy")
    memory_total_bytes: int
    memory_available_bytes: int
    vms_memory_mib: int
    vms: list[VmMetrics]


class TlsCsr(BaseModel):
    """A host's certificate signing request (its key stays on the host)."""

    csr_pem: str


class TlsInstall(BaseModel):
    """The host's certificate, signed by the cluster CA, and the CA's certificate."""

    ca_pem: str = Field(min_length=1, max_length=64 * 1024)
    cert_pem: str = Field(min_length=1, max_length=64 * 1024)


class TlsStatus(BaseModel):
    peer_port: int | None = Field(description="mutual-TLS port for other agents")
