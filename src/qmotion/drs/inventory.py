"""The manager's inventory, as its API reports hosts and VMs, turned into a DRS snapshot.

Mapping:
  host up -> ok, down -> failed (its VMs must leave), (entering-)maintenance -> maintenance;
  capacity is the host's CPUs and memory from its facts, less what the pre-checks hold back
  (the host's reservation, migrations under way towards it): one capacity model, so DRS never
  plans a move a pre-check refuses. A host whose agent never answered has no facts:
  it is failed, with its VMs' memory as capacity, so its VMs are evacuated and nothing lands
  on it.
  VM running (or paused) -> demand its vCPUs and memory until measured demand is fed in;
  stopped -> allocates its memory, demands nothing. A VM that is migrating right now is pinned
  where it is (a must run-on rule), so no plan moves it twice; so is a VM that needs attention
  (reconcile found its copies in doubt): nothing moves it until that is resolved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qmotion.api.server import HostOut, VmOut
from qmotion.drs.model import Health, HostSpec, Rule, Snapshot, VmSpec
from qmotion.migration.prechecks import HOST_RESERVED_MIB

HEALTH = {
    "up": Health.OK,
    "down": Health.FAILED,
    "maintenance": Health.OK,
    "entering-maintenance": Health.OK,
}
MAINTENANCE = ("maintenance", "entering-maintenance")


def snapshot_from_inventory(
    hosts: Sequence[HostOut],
    vms: Sequence[VmOut],
    rules: Sequence[Rule] = (),
    demand: Mapping[str, tuple[float, float]] | None = None,
    pinned: Mapping[str, str] | None = None,
    dirty: Mapping[str, float] | None = None,
    proactive: bool = False,
) -> Snapshot:
    """``demand``: measured (CPU cores, memory MiB) of running VMs; ``pinned``: VM -> host it
    must stay on (DRS's cool-down after a move); ``dirty``: measured dirty rates, MiB/s (a
    busy writer costs more to move); ``proactive``: a host whose agent reports degraded health
    is degraded (its VMs should leave, nothing new lands there); else it counts as ok. Rules
    naming VMs that do not exist are kept for the VMs that do (dropped when too few are left
    to mean anything)."""
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
        # The pre-checks' capacity: memory minus the host's reservation and what migrations
        # under way bring in (committed beyond the VMs placed on it).
        incoming = max(h.committed_mib - held.get(h.name, 0), 0)
        specs.append(
            HostSpec(
                name=h.name,
                cpu_capacity=h.facts.cpus,
                memory_mib=max(h.memory_mib - HOST_RESERVED_MIB - incoming, 1),
                health=Health.DEGRADED
                if proactive and h.state == "up" and h.facts.health == "degraded"
                else HEALTH[h.state],
                maintenance=h.state in MAINTENANCE,
            )
        )
    out, extra = [], []
    measured = demand or {}
    host_rules = [r for r in rules if r.strength == "must" and r.kind in ("run_on", "not_run_on")]
    held_here: set[str] = set()  # held VMs: their own host rules give way to the pin
    usable = {h.name for h in specs if h.usable}
    for vm in vms:
        idle = vm.state in ("stopped", "suspended")  # neither runs nor uses memory
        cpu, mem = measured.get(vm.name, (None, None))
        out.append(
            VmSpec(
                name=vm.name,
                host=vm.host,
                memory_mib=vm.memory_mib,
                vcpus=vm.vcpus,
                cpu_demand=0.0 if idle else cpu,
                memory_demand_mib=0.0 if idle else None if mem is None else min(mem, vm.memory_mib),
                dirty_rate_mib_s=0.0 if idle else (dirty or {}).get(vm.name, 0.0),
            )
        )
        stays = vm.migrating or vm.attention is not None
        where = vm.host if stays else (pinned or {}).get(vm.name)
        # A cool-down never holds a VM where a must rule says it may not be, nor on a host
        # it should leave (failed, degraded, maintenance).
        if (
            where is not None
            and not stays
            and (
                where not in usable
                or any(
                    vm.name in r.vms and ((r.kind == "run_on") != (where in r.hosts))
                    for r in host_rules
                )
            )
        ):
            where = None
        if stays:
            held_here.add(vm.name)
        if where is not None:
            extra.append(
                Rule(
                    # A ':' no operator's rule name can hold (NAME_PATTERN): a rule of theirs
                    # called "cooldown-web1" never collides with this pin.
                    name=f"{_pin_kind(vm)}:{vm.name}",
                    kind="run_on",
                    strength="must",
                    vms=[vm.name],
                    hosts=[where],
                )
            )
    names = {vm.name for vm in vms}
    host_names = {h.name for h in hosts}
    kept = []
    for r in rules:
        members = [v for v in r.vms if v in names]
        if r in host_rules:
            members = [v for v in members if v not in held_here]
        on = [h for h in r.hosts if h in host_names]
        pair = r.kind in ("affinity", "anti_affinity")
        if len(members) < (2 if pair else 1) or (not pair and not on):
            continue
        kept.append(r.model_copy(update={"vms": members, "hosts": on}))
    return Snapshot(hosts=specs, vms=out, rules=[*kept, *extra])


def _pin_kind(vm: VmOut) -> str:
    """Why a VM is pinned where it is, as its rule's name says."""
    if vm.migrating:
        return "migrating"
    return "attention" if vm.attention is not None else "cooldown"
