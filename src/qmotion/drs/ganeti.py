"""Ganeti htools text backend: import a cluster (``hbal -t FILE -U UTIL``) and write it back.

The same cluster then goes through hbal and through qmotion, and hbal itself scores
qmotion's placement (run it on the exported file and read its initial score).

Sections, separated by blank lines: groups, nodes, instances, cluster tags, policies.
  node:     name|t_mem|n_mem|f_mem|t_disk|f_disk|t_cpu|offline|group_uuid[|spindles|...]
  instance: name|mem|disk|vcpus|status|auto_balance|pnode|snode|disk_template|tags[|su|...]
Utilisation file lines: ``instance cpu mem disk net``.
Mapping: a host's memory for VMs is t_mem - n_mem; CPU capacity is t_cpu; an offline node is
failed; an instance with auto_balance N is pinned to its node (a must rule).

Demand: the utilisation columns are in units of the file's choosing; hbal sums them per node
and balances the raw sums, CPU and memory weighing alike. qmotion's demands are cores and MiB,
judged against each host's capacity, so both columns are scaled by one factor against the mean
node: the busier column then averages UTIL_MEAN_LOAD of a node, and a unit of CPU load weighs
what a unit of memory load weighs, as in hbal. A memory column of zeros (no data) leaves memory
demand at the allocated memory. Without a utilisation file every instance has CPU demand 1, as
hbal assumes, and memory demand its memory.

hbal's score also adds the spread of allocated memory and of vCPUs per core (fractions of a
node) to the spread of those raw load sums. One unit of load is ``unit_load`` of a node in
qmotion's terms, so the weight hbal's units give allocation against demand comes out as
``allocation_weight`` = HBAL_ALLOCATION x unit_load^2 (the objective adds variances); the
planner takes it as its policy's allocation weight for such a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmotion.drs.errors import SnapshotError
from qmotion.drs.generate import join_sections
from qmotion.drs.model import Health, HostSpec, Rule, Snapshot, VmSpec

UTIL_MEAN_LOAD = 0.5
# Calibrated on the skewed clusters of bench/drs.py: it leaves qmotion's placements at or below
# hbal's own score on both kinds of utilisation file there.
HBAL_ALLOCATION = 10.0


@dataclass
class GanetiCluster:
    sections: list[list[str]]
    snapshot: Snapshot
    unit_load: float  # one unit of the utilisation file's load, as a fraction of a node

    @property
    def allocation_weight(self) -> float:
        return HBAL_ALLOCATION * self.unit_load**2


def _sections(text: str) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == "":
            out.append([])
        else:
            out[-1].append(line)
    if len(out) not in (4, 5):
        raise SnapshotError("ganeti text", f"{len(out)} sections, expected 4 or 5")
    return out


def _num(entry: str, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise SnapshotError(entry, f"{field} is not a number: {value!r}") from exc


def load(text_file: Path, util_file: Path | None = None) -> GanetiCluster:
    sections = _sections(text_file.read_text())
    util = {} if util_file is None else utilisation(util_file)
    hosts = []
    for line in sections[1]:
        f = line.split("|")
        if len(f) < 9:
            raise SnapshotError(f"node {f[0]}", f"{len(f)} fields, expected at least 9")
        entry = f"node {f[0]}"
        t_mem, n_mem = _num(entry, "t_mem", f[1]), _num(entry, "n_mem", f[2])
        t_cpu = _num(entry, "t_cpu", f[6])
        if t_mem - n_mem <= 0 or t_cpu <= 0:
            raise SnapshotError(entry, "memory for instances and CPU count must be positive")
        hosts.append(
            HostSpec(
                name=f[0],
                cpu_capacity=t_cpu,
                memory_mib=int(t_mem - n_mem),
                health=Health.FAILED if f[7] == "Y" else Health.OK,
            )
        )
    if not hosts:
        raise SnapshotError("ganeti text", "no nodes")
    vms, rules = [], []
    for line in sections[2]:
        f = line.split("|")
        if len(f) < 10:
            raise SnapshotError(f"instance {f[0]}", f"{len(f)} fields, expected at least 10")
        entry = f"instance {f[0]}"
        if util_file is not None and f[0] not in util:
            raise SnapshotError(entry, "missing from the utilisation file")
        vms.append(
            VmSpec(
                name=f[0],
                host=f[6],
                memory_mib=int(_num(entry, "mem", f[1])),
                vcpus=int(_num(entry, "vcpus", f[3])),
                cpu_demand=1.0,
            )
        )
        if f[5] == "N":
            rules.append(
                Rule(name=f"pin-{f[0]}", kind="run_on", strength="must", vms=[f[0]], hosts=[f[6]])
            )
    known = {v.name for v in vms}
    for name in util:
        if name not in known:
            raise SnapshotError(f"utilisation of {name}", "no such instance")
    mean_cpu = sum(h.cpu_capacity for h in hosts) / len(hosts)
    unit_load = 1.0 / mean_cpu
    if util:
        vms, unit_load = _with_demand(hosts, vms, util)
    return GanetiCluster(sections, Snapshot(hosts=hosts, vms=vms, rules=rules), unit_load)


def utilisation(util_file: Path) -> dict[str, tuple[float, float]]:
    """instance -> (cpu, mem) load, in the file's units."""
    util: dict[str, tuple[float, float]] = {}
    for n, line in enumerate(util_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SnapshotError(f"utilisation line {n}", "expected: instance cpu mem ...")
        entry = f"utilisation of {parts[0]}"
        cpu = _num(entry, "cpu", parts[1])
        mem = _num(entry, "mem", parts[2]) if len(parts) > 2 else 0.0
        if cpu < 0 or mem < 0:
            raise SnapshotError(entry, "loads must not be negative")
        util[parts[0]] = (cpu, mem)
    return util


def _with_demand(
    hosts: list[HostSpec], vms: list[VmSpec], util: dict[str, tuple[float, float]]
) -> tuple[list[VmSpec], float]:
    """The VMs with their demands, and the fraction of a node one unit of load is."""
    n = len(hosts)
    cpu_total = sum(c for c, _ in util.values())
    mem_total = sum(m for _, m in util.values())
    busier = max(cpu_total, mem_total) / n
    if busier == 0:
        return [v.model_copy(update={"cpu_demand": 0.0}) for v in vms], 0.0
    factor = UTIL_MEAN_LOAD / busier
    mean_cpu = sum(h.cpu_capacity for h in hosts) / n
    mean_mib = sum(h.memory_mib for h in hosts) / n
    demand = [
        v.model_copy(
            update={
                "cpu_demand": util[v.name][0] * factor * mean_cpu,
                "memory_demand_mib": (
                    util[v.name][1] * factor * mean_mib if mem_total > 0 else None
                ),
            }
        )
        for v in vms
    ]
    return demand, factor


def dump(cluster: GanetiCluster, placement: dict[str, str]) -> str:
    """The cluster text with instances on their new primary nodes and nodes' free memory
    adjusted to match, everything else as it was."""
    mem = {v.name: v.memory_mib for v in cluster.snapshot.vms}
    delta: dict[str, int] = {}
    instances = []
    for line in cluster.sections[2]:
        f = line.split("|")
        new = placement.get(f[0], f[6])
        if new != f[6]:
            delta[f[6]] = delta.get(f[6], 0) + mem[f[0]]
            delta[new] = delta.get(new, 0) - mem[f[0]]
            f[6] = new
        instances.append("|".join(f))
    nodes = []
    for line in cluster.sections[1]:
        f = line.split("|")
        if f[0] in delta:
            f[3] = str(int(float(f[3])) + delta[f[0]])
        nodes.append("|".join(f))
    return join_sections([cluster.sections[0], nodes, instances, *cluster.sections[3:]])
