"""Ganeti htools text backend: import a cluster (``hbal -t FILE -U UTIL``) and write it back.

The same cluster then goes through hbal and through qmotion, and hbal itself scores
qmotion's placement (run it on the exported file and read its initial score).

Sections, separated by blank lines: groups, nodes, instances, cluster tags, policies.
  node:     name|t_mem|n_mem|f_mem|t_disk|f_disk|t_cpu|offline|group_uuid[|spindles|...]
  instance: name|mem|disk|vcpus|status|auto_balance|pnode|snode|disk_template|tags[|su|...]
Utilisation file lines: ``instance cpu mem disk net``.
Mapping: a host's memory for VMs is t_mem - n_mem; CPU capacity is t_cpu; a VM's CPU demand
is its utilisation's cpu (1 if absent, as hbal assumes), its memory demand its memory; an
offline node is failed; an instance with auto_balance N is pinned to its node (a must rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmotion.drs.errors import SnapshotError
from qmotion.drs.generate import join_sections
from qmotion.drs.model import Health, HostSpec, Rule, Snapshot, VmSpec


@dataclass
class GanetiCluster:
    sections: list[list[str]]
    snapshot: Snapshot


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
    util: dict[str, float] = {}
    if util_file is not None:
        for n, line in enumerate(util_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise SnapshotError(f"utilisation line {n}", "expected: instance cpu mem ...")
            util[parts[0]] = _num(f"utilisation of {parts[0]}", "cpu", parts[1])
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
                cpu_demand=util.get(f[0], 1.0),
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
    return GanetiCluster(sections, Snapshot(hosts=hosts, vms=vms, rules=rules))


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
