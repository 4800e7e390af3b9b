"""Host facts read from /proc and QEMU, and a sampler of host and per-VM CPU and memory use."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmotion import __version__
from qmotion.agent.config import AgentConfig
from qmotion.agent.network.net import bridges
from qmotion.api.host import (
    AccelInfo,
    Datastore,
    HostFacts,
    HostMetrics,
    MigrationNetwork,
    VmMetrics,
)
from qmotion.hypervisor.qemu import qemu_info

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo."""
    model, flags = "unknown", list[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value.split()
    return model, flags


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def _ipv4_interfaces() -> dict[str, tuple[int, str, int | None]]:
    """Every IPv4 address here: its prefix length, interface and the interface's MTU."""
    proc = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=False
    )
    out: dict[str, tuple[int, str, int | None]] = {}
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        return out
    for link in links:
        for a in link.get("addr_info", []):
            if "local" in a:
                out[a["local"]] = (int(a.get("prefixlen", 32)), link["ifname"], link.get("mtu"))
    return out


def migration_networks(config: AgentConfig) -> list[MigrationNetwork]:
    """The configured migration addresses in order, then the management address."""
    known = _ipv4_interfaces()
    out = []
    wanted = [(a, "migration") for a in config.migration_addresses]
    if config.address and config.address not in config.migration_addresses:
        wanted.append((config.address, "management"))
    for address, role in wanted:
        prefixlen, ifname, mtu = known.get(address, (32, None, None))
        out.append(
            MigrationNetwork(
                address=address, prefixlen=prefixlen, ifname=ifname, mtu=mtu, role=role
            )
        )
    return out


def tcp_rmem_max() -> int | None:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _health(config: AgentConfig) -> dict[str, Any]:
    """Degraded when a datastore VMs live on cannot be used from this host (gone, read-only).
    A full one is not: moving VMs to another host does not give them room."""
    reasons = []
    for d in config.datastores:
        try:
            st = os.statvfs(d.path)
        except OSError as exc:
            reasons.append(f"datastore {d.name}: {exc.strerror or exc}")
            continue
        if not os.access(d.path, os.W_OK) or st.f_flag & os.ST_RDONLY:
            reasons.append(f"datastore {d.name}: not writable")
    return {"health": "degraded" if reasons else "ok", "health_reasons": reasons}


class HealthCheck:
    """The host's health, checked in the background: a datastore that hangs (a hard NFS
    mount whose server is gone) must not hang the facts the manager polls to see the agent
    alive. One check at a time; one that does not answer in time is itself the reason."""

    def __init__(
        self,
        config: AgentConfig,
        timeout_s: float = 5.0,
        probe: Callable[[AgentConfig], dict[str, Any]] = _health,
    ) -> None:
        self.config, self.timeout_s, self.probe = config, timeout_s, probe
        self.last: dict[str, Any] = {"health": "ok", "health_reasons": []}
        self._running: asyncio.Future[dict[str, Any]] | None = None

    async def check(self) -> dict[str, Any]:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(asyncio.to_thread(self.probe, self.config))
        try:
            self.last = await asyncio.wait_for(asyncio.shield(self._running), self.timeout_s)
        except TimeoutError:
            self.last = {
                "health": "degraded",
                "health_reasons": [f"datastore check did not answer in {self.timeout_s:.0f} s"],
            }
        return self.last


def host_facts(
    config: AgentConfig,
    accel: AccelInfo,
    peer_port: int | None = None,
    health: dict[str, Any] | None = None,
    cert_not_after: datetime | None = None,
) -> HostFacts:
    model, flags = cpu_info()
    info = qemu_info()
    return HostFacts(
        name=config.name,
        address=config.address,
        cpu_model=model,
        cpu_flags=flags,
        cpus=config.cpus or os.cpu_count() or 1,
        memory_bytes=config.memory_bytes or meminfo()["MemTotal"],
        qemu_version=info.version,
        machine_types=info.machine_types,
        machine_aliases=info.machine_aliases,
        cpu_models=info.cpu_models,
        accel=accel,
        bridges=bridges(),
        datastores=[
            Datastore(name=d.name, path=str(d.path), shared=d.shared) for d in config.datastores
        ],
        agent_version=__version__,
        migration_networks=migration_networks(config),
        tcp_rmem_max=tcp_rmem_max(),
        peer_port=peer_port,
        cert_not_after=cert_not_after,
        **(health or {}),
    )


def host_cpu_ticks() -> tuple[int, int]:
    """(total, idle) clock ticks of the whole machine so far (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), idle


def proc_cpu_ticks(pid: int) -> int | None:
    """Clock ticks (user + system) a process has used so far; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


def _proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class VmProcess:
    name: str
    pid: int
    memory_mib: int


class MetricsSampler:
    """CPU use is a rate, so it needs two readings; each ``sample`` measures since the last."""

    def __init__(self, cpus: int | None = None) -> None:
        self._cpus = cpus
        # VM -> its guest's dirty rate, MiB/s, from the last periodic measurement.
        self.dirty: dict[str, float] = {}
        self._host_prev = host_cpu_ticks()
        self._vm_prev: dict[int, tuple[int, float]] = {}
        self._last: HostMetrics | None = None

    def sample(self, vms: list[VmProcess]) -> HostMetrics:
        total, idle = host_cpu_ticks()
        ptotal, pidle = self._host_prev
        self._host_prev = (total, idle)
        busy = (total - ptotal) - (idle - pidle)
        cpu_pct = 100.0 * busy / (total - ptotal) if total > ptotal else 0.0
        now = time.monotonic()
        vm_metrics = []
        seen: dict[int, tuple[int, float]] = {}
        for vm in vms:
            ticks = proc_cpu_ticks(vm.pid)
            if ticks is None:
                continue
            seen[vm.pid] = (ticks, now)
            prev = self._vm_prev.get(vm.pid)
            pct = 0.0
            if prev is not None and now > prev[1]:
                pct = 100.0 * (ticks - prev[0]) / CLK_TCK / (now - prev[1])
            vm_metrics.append(
                VmMetrics(
                    name=vm.name,
                    cpu_percent=round(pct, 1),
                    rss_bytes=_proc_rss(vm.pid),
                    memory_mib=vm.memory_mib,
                    dirty_rate_mib_s=self.dirty.get(vm.name),
                )
            )
        self._vm_prev = seen
        mem = meminfo()
        self._last = HostMetrics(
            sampled_at=datetime.now(UTC),
            cpus=self._cpus or os.cpu_count() or 1,
            cpu_percent=round(cpu_pct, 1),
            memory_total_bytes=mem["MemTotal"],
            memory_available_bytes=mem.get("MemAvailable", mem.get("MemFree", 0)),
            vms_memory_mib=sum(v.memory_mib for v in vms),
            vms=vm_metrics,
        )
        return self._last

    @property
    def last(self) -> HostMetrics | None:
        return self._last
