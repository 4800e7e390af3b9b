"""The manager's inventory, as its API reports hosts and VMs, turned into a DRS snapshot.

Mapping:
  host up -> ok, down -> failed (its VMs must leave), maintenance -> maintenance; capacity is
  the host's CPUs and memory from its facts. A host whose agent never answered has no facts:
  it is failed, with its VMs' memory as capacity, so its VMs are evacuated and nothing lands
  on it.
  VM running (or paused) -> demand its vCPUs and memory until measured demand is fed in;
  stopped -> allocates its memory, demands nothing. A VM that is migrating right now is pinned
  where it is (a must run-on rule), so no plan moves it twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from qmotion.api.server import HostOut, VmOut
from qmotion.drs.model import Health, HostSpec, Rule, Snapshot, VmSpec

HEALTH = {"up": Health.OK, "down": Health.FAILED, "maintenance": Health.OK}


def snapshot_from_inventory(hosts: Sequence[HostOut], vms: Sequence[VmOut]) -> Snapshot:
    held: dict[str, int] = {}
    for vm in vms:
        held[vm.host] = held.get(vm.host, 0) + vm.memory_mib
    specs = []
    for h in hosts:
        if h.facts is None or h.memory_mib <= 0:
            specs.append(
                HostSpec(
                    name=h.name,
                    cpu_capacity=1,
                    memory_mib=max(held.get(h.name, 0), 1),
                    health=Health.FAILED,
                )
            )
            continue
        specs.append(
            HostSpec(
                name=h.name,
                cpu_capacity=h.facts.cpus,
                memory_mib=h.memory_mib,
                health=HEALTH[h.state],
                maintenance=h.state == "maintenance",
            )
        )
    out, rules = [], []
    for vm in vms:
        idle = vm.state in ("stopped", "suspended")  # neither runs nor uses memory
        out.append(
            VmSpec(
                name=vm.name,
                host=vm.host,
                memory_mib=vm.memory_mib,
                vcpus=vm.vcpus,
                cpu_demand=0.0 if idle else None,
                memory_demand_mib=0.0 if idle else None,
            )
        )
        if vm.migrating:
            rules.append(
                Rule(
                    name=f"migrating-{vm.name}",
                    kind="run_on",
                    strength="must",
                    vms=[vm.name],
                    hosts=[vm.host],
                )
            )
    return Snapshot(hosts=specs, vms=out, rules=rules)
