"""Pre-checks of a live migration: pure, on a snapshot of the inventory; nothing is touched.

Each refusal names the reason, the field of the request it concerns and its HTTP status:
409 when the state of the cluster forbids the move now, 422 when the request itself is wrong.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

HOST_RESERVED_MIB = 512  # what a host keeps for itself and QEMU overhead, never given to VMs


@dataclass(frozen=True)
class NetworkView:
    """An address a host receives migrations on (preferred first), with its interface."""

    address: str
    prefixlen: int
    mtu: int | None = None
    ifname: str | None = None

    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefixlen}").network


@dataclass(frozen=True)
class HostView:
    name: str
    state: str  # up, down, maintenance
    memory_mib: int
    committed_mib: int  # memory of the VMs placed on it, incoming migrations included
    cpu_models: frozenset[str]
    machine_types: frozenset[str]
    machine_aliases: dict[str, str]
    bridges: frozenset[str]
    datastores: frozenset[str]
    accel: str = ""  # kvm or tcg
    qemu_version: str = ""
    networks: tuple[NetworkView, ...] = ()
    peer_port: int | None = None  # mutual-TLS port: the host has its cluster certificate


@dataclass(frozen=True)
class VmView:
    name: str
    host: str
    state: str
    memory_mib: int
    cpu_model: str
    machine: str
    bridges: tuple[str, ...]
    datastores: tuple[str, ...]
    migrating: bool = False
    attention: str | None = None  # why it needs an operator: it moves nowhere until resolved


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    status: int
    field: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class PrecheckInput:
    vm: VmView
    target_name: str
    hosts: dict[str, HostView] = field(default_factory=dict)
    tls: bool = False  # the cluster encrypts migration streams
    copy_to: str | None = None  # shared-nothing: the disks are copied to this datastore
    # The VM's datastores not marked shared on both hosts: a datastore of the same name on
    # the target is other storage, so without a copy the VM would find no disk (or another's).
    not_shared: frozenset[str] = frozenset()


def copied_disks(
    datastores: tuple[str, ...], copy_to: str, not_shared: frozenset[str]
) -> list[int]:
    """The disks a shared-nothing migration to ``copy_to`` copies: all but those already
    on it when both hosts share it."""
    return [i for i, ds in enumerate(datastores) if not (ds == copy_to and ds not in not_shared)]


def attention_refusals(vm: str, attention: str | None) -> list[Refusal]:
    """A VM marked as needing an operator (reconcile or a migration found its copies in
    doubt) is moved by nothing, live, storage or cold, until the mark is resolved."""
    if attention is None:
        return []
    return [
        Refusal(
            "vm_attention",
            f"VM {vm} needs attention: {attention}; it is not moved until that is resolved",
            409,
        )
    ]


def precheck(inp: PrecheckInput) -> list[Refusal]:
    """Every reason the migration cannot start; empty means go."""
    vm, target_name = inp.vm, inp.target_name
    # First: the refusal's code is the first one's, and this one explains the others.
    out: list[Refusal] = attention_refusals(vm.name, vm.attention)

    def to_target(code: str, message: str, status: int) -> Refusal:
        """A refusal about the requested target host, reported against the ``to`` field."""
        return Refusal(code, message, status, field="to", host=target_name)

    if vm.migrating:
        out.append(Refusal("already_migrating", f"VM {vm.name} is already migrating", 409))
    if vm.state != "running":
        out.append(
            Refusal(
                "vm_not_running",
                f"VM {vm.name} is {vm.state}; only a running VM live-migrates",
                409,
            )
        )
    if target_name == vm.host:
        out.append(
            to_target(
                "same_host",
                f"VM {vm.name} already runs on {target_name}",
                422,
            )
        )
        return out
    source = inp.hosts.get(vm.host)
    if source is not None and source.accel == "tcg" and _major(source.qemu_version) < 9:
        # QEMU before 9.0 clears migration dirty bits without resetting TCG's TLB, so guest
        # writes through cached TLB entries are never re-sent: the guest would arrive with
        # stale memory (seen here as guest kernel crashes after migration).
        out.append(
            Refusal(
                "unsafe_tcg_migration",
                f"host {vm.host} runs {vm.name} under TCG on QEMU {source.qemu_version}, which "
                "loses guest writes while migrating (fixed in QEMU 9.0); upgrade QEMU on the "
                "host or move the VM powered off",
                409,
                host=vm.host,
            )
        )
    target = inp.hosts.get(target_name)
    if target is None:
        known = ", ".join(sorted(inp.hosts)) or "none"
        out.append(
            to_target(
                "unknown_host",
                f"no host named {target_name!r} (hosts: {known})",
                422,
            )
        )
        return out
    if target.state != "up":
        out.append(
            to_target(
                "host_unavailable",
                f"host {target_name} is {target.state}",
                409,
            )
        )
    free = target.memory_mib - HOST_RESERVED_MIB - target.committed_mib
    if vm.memory_mib > free:
        out.append(
            to_target(
                "insufficient_memory",
                f"host {target_name} has {max(free, 0)} MiB free for VMs; {vm.name} needs "
                f"{vm.memory_mib} MiB",
                409,
            )
        )
    if vm.cpu_model not in target.cpu_models:
        out.append(
            to_target(
                "cpu_model_unsupported",
                f"host {target_name} does not support CPU model {vm.cpu_model}",
                409,
            )
        )
    machine = target.machine_aliases.get(vm.machine, vm.machine)
    if vm.machine not in target.machine_types and machine not in target.machine_types:
        out.append(
            to_target(
                "machine_type_unavailable",
                f"host {target_name} cannot run machine type {vm.machine}",
                409,
            )
        )
    for bridge in vm.bridges:
        if bridge not in target.bridges:
            out.append(
                to_target(
                    "bridge_missing",
                    f"network bridge {bridge} of {vm.name} is absent on {target_name}",
                    409,
                )
            )
    out.extend(_datastore_refusals(inp, target))
    out.extend(_mtu_mismatches(vm.name, source, target))
    if inp.tls:
        for h in (source, target):
            if h is not None and h.peer_port is None:
                # Plaintext only when the cluster is configured insecure: never as a fallback.
                out.append(
                    Refusal(
                        "tls_unavailable",
                        f"host {h.name} has no certificate from the cluster CA, and the "
                        "cluster encrypts migrations; register the host again",
                        409,
                        host=h.name,
                    )
                )
    return out


def _datastore_refusals(inp: PrecheckInput, target: HostView) -> list[Refusal]:
    vm, target_name, copy_to = inp.vm, inp.target_name, inp.copy_to
    out = []
    if copy_to is None:
        for ds in dict.fromkeys(vm.datastores):
            if ds not in target.datastores:
                out.append(
                    Refusal(
                        "datastore_unreachable",
                        f"datastore {ds} holding a disk of {vm.name} is not reachable "
                        f"from {target_name} (--datastore DS moves the disks with the VM)",
                        409,
                        field="to",
                        host=target_name,
                    )
                )
            elif ds in inp.not_shared:
                out.append(
                    Refusal(
                        "datastore_not_shared",
                        f"datastore {ds} holding a disk of {vm.name} is not shared with "
                        f"{target_name}: its files are not there (--datastore DS moves the "
                        "disks with the VM)",
                        409,
                        field="to",
                        host=target_name,
                    )
                )
        return out
    if copy_to not in target.datastores:
        known = ", ".join(sorted(target.datastores)) or "none"
        return [
            Refusal(
                "datastore_missing",
                f"datastore {copy_to} is not available on host {target_name} (it has: {known})",
                422,
                field="datastore",
                host=target_name,
            )
        ]
    if not vm.datastores:
        return [Refusal("no_disks", f"VM {vm.name} has no disks to move", 422, field="datastore")]
    if not copied_disks(vm.datastores, copy_to, inp.not_shared):
        return [
            Refusal(
                "same_datastore",
                f"the disks of {vm.name} are on datastore {copy_to} already, which both hosts "
                "share: migrate without --datastore",
                422,
                field="datastore",
            )
        ]
    return out


def _mtu_mismatches(vm: str, source: HostView | None, target: HostView) -> list[Refusal]:
    """The migration network both ends are on, with different MTUs: frames the larger end
    sends are dropped by the smaller (one L2 segment reports no path MTU), and the stream
    stalls once it fills them. Checked on the preferred network, the one the stream takes."""
    if source is None or not target.networks:
        return []
    preferred = target.networks[0]
    mine = next((n for n in source.networks if n.network() == preferred.network()), None)
    if mine is None or mine.mtu is None or preferred.mtu is None or mine.mtu == preferred.mtu:
        return []
    return [
        Refusal(
            "mtu_mismatch",
            f"MTU mismatch on migration network {preferred.network()}: {source.name} "
            f"{mine.ifname} has MTU {mine.mtu}, {target.name} {preferred.ifname} has MTU "
            f"{preferred.mtu}; set the same MTU (jumbo frames) on both ends to migrate {vm}",
            409,
            field="to",
            host=target.name,
        )
    ]


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
