"""What the console's pages show, computed from the API's models: pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmotion.api.migration import MigrationReport
from qmotion.api.server import HostOut, TaskOut, TaskState, VmOut
from qmotion.api.sizes import format_size
from qmotion.drs.model import Snapshot

FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
MIB = 2**20


class Choices(dict[str, str]):
    """Form values for a template: a field never filled in reads as empty (the templates are
    strict about every other name)."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class Bar:
    """One use of a capacity: allocated (committed) and measured, as fractions."""

    label: str
    allocated: float
    measured: float | None
    text: str

    @property
    def allocated_pct(self) -> int:
        return round(min(self.allocated, 1.0) * 100)

    @property
    def measured_pct(self) -> int:
        return round(min(self.measured or 0.0, 1.0) * 100)


@dataclass(frozen=True)
class HostRow:
    name: str
    state: str  # up, down, degraded, entering-maintenance, maintenance
    reason: str | None
    accel: str
    cpus: int
    vms: list[str]
    cpu: Bar
    memory: Bar
    datastores: list[str] = field(default_factory=list)


def host_state(h: HostOut) -> tuple[str, str | None]:
    """The state an operator reads, with why: a host that answers but reports something its
    VMs rely on failing is degraded, not up."""
    if h.state in ("maintenance", "entering-maintenance"):
        return h.state, h.maintenance_reason
    if h.state == "up" and h.facts is not None and h.facts.health == "degraded":
        return "degraded", "; ".join(h.facts.health_reasons) or "degraded"
    return h.state, None


def host_rows(hosts: list[HostOut], snap: Snapshot | None) -> list[HostRow]:
    """Each host with its bars: memory committed to VMs and CPUs given as vCPUs (allocated),
    and the demand DRS measured (when it has measured)."""
    vcpus: dict[str, int] = {}
    cpu_demand: dict[str, float] = {}
    mem_demand: dict[str, float] = {}
    measured: set[str] = set()
    for v in snap.vms if snap is not None else []:
        vcpus[v.host] = vcpus.get(v.host, 0) + v.vcpus
        if v.cpu_demand is not None:
            cpu_demand[v.host] = cpu_demand.get(v.host, 0.0) + v.cpu_demand
            measured.add(v.host)
        if v.memory_demand_mib is not None:
            mem_demand[v.host] = mem_demand.get(v.host, 0.0) + v.memory_demand_mib
    out = []
    for h in hosts:
        state, reason = host_state(h)
        cpus = h.facts.cpus if h.facts is not None else 0
        mem = max(h.memory_mib, 1)
        used_cpu = cpu_demand.get(h.name)
        cpu = Bar(
            "CPU",
            vcpus.get(h.name, 0) / max(cpus, 1),
            None if used_cpu is None else used_cpu / max(cpus, 1),
            f"{vcpus.get(h.name, 0)} vCPUs on {cpus} CPUs"
            + ("" if used_cpu is None else f", {used_cpu:.2f} busy"),
        )
        used_mem = mem_demand.get(h.name) if h.name in measured else None
        memory = Bar(
            "Memory",
            h.committed_mib / mem,
            None if used_mem is None else used_mem / mem,
            f"{h.committed_mib} of {h.memory_mib} MiB committed"
            + ("" if used_mem is None else f", {used_mem:.0f} MiB used"),
        )
        out.append(
            HostRow(
                name=h.name,
                state=state,
                reason=reason,
                accel=h.facts.accel.name if h.facts is not None else "?",
                cpus=cpus,
                vms=list(h.vms),
                cpu=cpu,
                memory=memory,
                datastores=[d.name for d in h.facts.datastores] if h.facts is not None else [],
            )
        )
    return out


def vm_datastores(v: VmOut) -> list[str]:
    return sorted({d.datastore for d in v.disks})


def vm_rows(vms: list[VmOut], query: str = "") -> list[VmOut]:
    """The VMs whose name, host, state, address, MAC or a datastore contains every word of
    ``query`` (case-insensitive)."""
    words = query.lower().split()
    if not words:
        return list(vms)

    def haystack(v: VmOut) -> str:
        parts = [v.name, v.host, str(v.state), v.address or "", v.mac, *vm_datastores(v)]
        return " ".join(parts).lower()

    return [v for v in vms if all(w in haystack(v) for w in words)]


@dataclass(frozen=True)
class Figure:
    label: str
    value: str


def task_title(t: TaskOut) -> str:
    kinds = {
        "migrate": "Live migration",
        "storage-move": "Storage move",
        "cold-migrate": "Cold migration",
        "drs-apply": "DRS recommendations",
        "maintenance": "Enter maintenance",
        "maintenance-exit": "Exit maintenance",
    }
    what = kinds.get(t.kind, t.kind)
    if t.operation is not None and t.operation.host:
        return f"{what}: {t.operation.host}"
    if t.vm and t.source and t.destination and t.source != t.destination:
        return f"{what} of {t.vm}: {t.source} → {t.destination}"
    if t.vm:
        return f"{what} of {t.vm}" + (f" on {t.source}" if t.source else "")
    return what


def progress_figures(t: TaskOut) -> list[Figure]:
    """What the task page shows while it runs: the migration's figures, or the disk copy's."""
    out = [Figure("State", str(t.state)), Figure("Phase", str(t.phase or "-"))]
    s = t.stats
    if s is not None:
        dirty = s.dirty_pages_rate * s.page_size
        out += [
            Figure("Transferred", format_size(s.transferred)),
            Figure("Remaining", format_size(s.remaining)),
            Figure("Rate", f"{s.mbps:.0f} Mbit/s"),
            Figure("Dirty rate", f"{dirty / MIB:.1f} MiB/s"),
            Figure("Passes", str(s.passes)),
            Figure("Convergence rung", s.rung or "-"),
        ]
        if s.throttle_pct:
            out.append(Figure("CPU throttle", f"{s.throttle_pct}%"))
    m = t.mirror
    if m is not None:
        out += [
            Figure("Disk copy", str(m.phase)),
            Figure(
                "Copied",
                f"{format_size(m.total_bytes - m.remaining_bytes)} of {format_size(m.total_bytes)}",
            ),
            Figure("Copy rate", f"{m.rate_bps / MIB:.1f} MiB/s"),
        ]
    return out


def is_final(t: TaskOut) -> bool:
    return t.state in FINAL


def report_rows(r: MigrationReport) -> list[tuple[str, str]]:
    """The migration report's headline figures, as ``task report`` prints them."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    rows = [
        ("Outcome", str(r.outcome)),
        ("Total (QEMU)", ms(r.total_ms)),
        ("Pause (QEMU downtime)", ms(r.downtime_ms)),
        ("Guest paused (agents' clocks)", ms(r.guest_paused_ms)),
        ("Memory sent", "-" if r.bytes is None else format_size(r.bytes)),
        ("Passes", "-" if r.passes is None else str(r.passes)),
        ("Throughput", "-" if r.throughput_mbps is None else f"{r.throughput_mbps:.0f} Mbit/s"),
        ("Whole task", ms(r.wall_ms)),
    ]
    return rows
