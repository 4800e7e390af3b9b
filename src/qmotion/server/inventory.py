"""Hosts and VMs: registration, refresh, VM lifecycle through agents, address and MAC pools."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from qmotion.api.host import HostFacts, HostMetrics, TlsInstall
from qmotion.api.server import HostOut, HostRegister, PoolSet, VmCreate, VmOut
from qmotion.api.storage import DiskUsage
from qmotion.api.vm import (
    CloudInit,
    Disk,
    DiskBoot,
    GuestConfig,
    KernelBoot,
    Nic,
    VmSpec,
)
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError
from qmotion.migration.prechecks import HOST_RESERVED_MIB, HostView, NetworkView
from qmotion.pki import ClusterCA, PkiError
from qmotion.server.agents import AgentConnector, agent_errors
from qmotion.server.db import (
    ACTIVE_TASK_STATES,
    Database,
    Host,
    HostMaintenance,
    Task,
    Vm,
    utcnow,
)
from qmotion.server.errors import Conflict, Invalid, ManagerError, NotFound, Upstream
from qmotion.server.images import image_disk
from qmotion.server.vm_lifecycle import VmLifecycle

log = logging.getLogger(__name__)
T = TypeVar("T")
VM_BRIDGE = "vmbr0"
# Agents read at once by a refresh round (each call waits on the network, not the CPU).
REFRESH_WORKERS = 16
# Most capable first. Under TCG only qemu64 is emulated without dropping features, so a
# cluster with any TCG host gets qemu64 (as EVC picks the oldest generation in the cluster).
CPU_PREFERENCE = (
    "Cascadelake-Server",
    "Skylake-Server",
    "Broadwell",
    "Haswell",
    "IvyBridge",
    "SandyBridge",
    "Westmere",
    "Nehalem",
    "qemu64",
)


def _host_addresses(h: Host) -> set[str]:
    """Every address a host is known by: its agent URL's, and what its facts report."""
    out = {str(httpx.URL(h.agent_url).host)}
    facts = h.facts or {}
    out.add(str(facts.get("address") or ""))
    out |= {str(n.get("address")) for n in facts.get("migration_networks", []) or []}
    return out - {"", "None"}


class Inventory(VmLifecycle):
    def __init__(
        self,
        db: Database,
        agents: AgentConnector | None = None,
        ca: ClusterCA | None = None,
        manager_addresses: tuple[str, ...] = (),
    ) -> None:
        self.db = db
        # Never in a host's certificate: the CLI checks the manager's by the cluster CA.
        self.manager_addresses = manager_addresses
        self.agents = agents or AgentConnector()
        # None: the cluster is configured insecure (plaintext migration streams).
        self.ca = ca

    @property
    def tls(self) -> bool:
        return self.ca is not None

    # ------------------------------------------------------------------ hosts

    def agent(self, host: Host, timeout_s: float = 120.0) -> AgentClient:
        return self.agents.client(host.agent_url, host.token, timeout_s=timeout_s)

    def call(
        self,
        host: Host,
        fn: Callable[[AgentClient], T],
        vm: str | None = None,
        timeout_s: float = 120.0,
    ) -> T:
        with self.agent(host, timeout_s) as client, agent_errors(host.name, vm):
            return fn(client)

    def issue_certificate(self, client: AgentClient, name: str, facts: HostFacts) -> None:
        """The host's certificate for its name and the addresses it is reached at."""
        assert self.ca is not None
        addresses = self.certifiable(name, facts)
        csr = client.tls_csr()
        cert = self.ca.sign_host(csr.csr_pem, name, addresses)
        client.install_tls(TlsInstall(ca_pem=self.ca.cert_pem, cert_pem=cert))

    def certifiable(self, name: str, facts: HostFacts) -> list[str]:
        """What a host's certificate may name of the addresses its agent reports: IPv4
        addresses only (never a name), those an admin approved when it joined, and never one
        held by another host or the manager's own: a host's word cannot make the cluster CA
        vouch for it as someone else."""
        reported = [facts.address, *(n.address for n in facts.migration_networks)]
        with self.db.session() as s:
            me = s.scalars(select(Host).where(Host.name == name)).first()
            approved = set(me.approved) if me is not None and me.approved is not None else None
            taken = set(self.manager_addresses)
            for other in s.scalars(select(Host).where(Host.name != name)):
                taken |= _host_addresses(other)
        out: list[str] = []
        for a in reported:
            try:
                ip = str(ipaddress.IPv4Address(a or ""))
            except ValueError:
                continue
            if ip in taken or (approved is not None and ip not in approved) or ip in out:
                if ip in taken:
                    log.warning(
                        "host %s reports %s, an address of another: not certified", name, ip
                    )
                continue
            out.append(ip)
        return out

    def register_host(self, req: HostRegister) -> HostOut:
        try:
            with self.agents.client(req.agent_url, req.token, timeout_s=60) as client:
                facts = client.host()
                if self.ca is not None:
                    self.issue_certificate(client, req.name, facts)
                    facts = client.host()  # now with its mutual-TLS port
        except PkiError as exc:
            raise Invalid(str(exc), field="name", host=req.name) from exc
        except ApiError as exc:
            raise Invalid(
                f"agent at {req.agent_url} refused: {exc}", field="token", host=req.name
            ) from exc
        except ClientError as exc:
            raise Invalid(
                f"agent at {req.agent_url} unreachable: {exc}", field="agent_url", host=req.name
            ) from exc
        with self.db.session() as s:
            host = s.scalars(select(Host).where(Host.name == req.name)).first()
            if host is None:
                host = Host(name=req.name, agent_url=req.agent_url, token=req.token)
                s.add(host)
            host.agent_url, host.token = req.agent_url, req.token
            host.facts = facts.model_dump(mode="json")
            host.state, host.last_seen = "up", utcnow()
            s.flush()
            return self.host_out(s, host)

    def refresh_hosts(
        self,
        down_grace_s: float = 0.0,
        on_metrics: Callable[[str, HostMetrics], None] | None = None,
    ) -> None:
        """Re-read every agent: facts, and whether the host answers at all. A host is down
        once its agent has not answered for ``down_grace_s``; ``on_metrics`` receives each
        agent's latest usage sample (measured demand for DRS)."""
        with self.db.session() as s:
            hosts = [
                (h.id, h.name, h.agent_url, h.token, h.facts is None)
                for h in s.scalars(select(Host))
            ]

        def one(hid: int, name: str, url: str, token: str, joined: bool) -> None:
            try:
                with self.agents.client(url, token, timeout_s=10) as client:
                    facts: HostFacts | None = client.host()
                    if joined and self.ca is not None and facts is not None:
                        # A host that joined is certified for its management address;
                        # now that it answers, for its migration addresses too.
                        self.issue_certificate(client, name, facts)
                        facts = client.host()
                    if on_metrics is not None:
                        try:
                            on_metrics(name, client.metrics())
                        except ClientError as exc:  # usage is optional, the facts are not
                            log.warning("host %s: no metrics: %s", name, exc)
            except (ClientError, PkiError) as exc:
                log.warning("host %s unreachable: %s", name, exc)
                facts = None
            with self.db.session() as s:
                host = s.get(Host, hid)
                if host is None:
                    return
                if facts is None:
                    silent = (utcnow() - (host.last_seen or host.registered_at)).total_seconds()
                    if silent >= down_grace_s:
                        # Only from up: maintenance (set meanwhile on the event loop) stays.
                        s.execute(
                            update(Host)
                            .where(Host.id == hid, Host.state == "up")
                            .values(state="down")
                            .execution_options(synchronize_session=False)
                        )
                else:
                    host.facts = facts.model_dump(mode="json")
                    host.last_seen = utcnow()
                    s.execute(
                        update(Host)
                        .where(Host.id == hid, Host.state == "down")
                        .values(state="up")
                        .execution_options(synchronize_session=False)
                    )

        # Hosts in parallel: one at a time, a thousand agents a few ms away each would not
        # all be read within the refresh period.
        with ThreadPoolExecutor(REFRESH_WORKERS, thread_name_prefix="refresh") as pool:
            for done in [pool.submit(one, *h) for h in hosts]:
                done.result()

    def host_by_name(self, s: Session, name: str, field: str = "host") -> Host:
        host = s.scalars(select(Host).where(Host.name == name)).first()
        if host is None:
            known = ", ".join(h.name for h in s.scalars(select(Host))) or "none"
            raise Invalid(f"no host named {name!r} (hosts: {known})", field=field, host=name)
        return host

    def host_out(
        self,
        s: Session,
        host: Host,
        committed: dict[str, int] | None = None,
        reasons: dict[str, str | None] | None = None,
    ) -> HostOut:
        facts = HostFacts.model_validate(host.facts) if host.facts else None
        return HostOut(
            name=host.name,
            agent_url=host.agent_url,
            state=host.state,
            last_seen=host.last_seen,
            vms=sorted(v.name for v in host.vms),
            memory_mib=(facts.memory_bytes >> 20) if facts else 0,
            committed_mib=(committed or self.committed(s)).get(host.name, 0),
            facts=facts,
            maintenance_reason=(reasons or self.maintenance_reasons(s)).get(host.name),
        )

    def list_hosts(self) -> list[HostOut]:
        with self.db.session() as s:
            committed, reasons = self.committed(s), self.maintenance_reasons(s)
            return [
                self.host_out(s, h, committed, reasons)
                for h in s.scalars(select(Host).order_by(Host.name))
            ]

    @staticmethod
    def maintenance_reasons(s: Session) -> dict[str, str | None]:
        """Why each host entering maintenance is not empty yet (read once per listing)."""
        return {m.host: m.reason for m in s.scalars(select(HostMaintenance))}

    @staticmethod
    def committed(s: Session) -> dict[str, int]:
        """Memory promised on each host: its VMs plus VMs queued or migrating towards it.

        Summed by the database: it runs on every migration request and pre-check, and
        loading every VM's row (with its spec) cost ~7 s per request at 20 000 VMs."""
        out: dict[str, int] = {
            name: int(total or 0)
            for name, total in s.execute(
                select(Host.name, func.sum(Vm.memory_mib)).join(Vm.host).group_by(Host.name)
            )
        }
        moving = (
            select(Task.destination, Vm.memory_mib, Host.name)
            .join(Vm, Vm.name == Task.vm)
            .join(Host, Vm.host_id == Host.id)
            .where(Task.state.in_(ACTIVE_TASK_STATES), Task.destination.is_not(None))
        )
        for destination, memory_mib, where in s.execute(moving):
            # A migration that already moved the inventory (its last steps still running)
            # is counted on its new host above: counting it again refused the next move
            # into that host for memory it does not use (seen in the maintenance test).
            if destination is not None and destination != where:
                out[destination] = out.get(destination, 0) + memory_mib
        return out

    def host_views(self, s: Session) -> dict[str, HostView]:
        """Every host as the pre-checks see it, read in one pass (this runs per request)."""
        committed = self.committed(s)
        return {
            h.name: self._host_view(h, committed.get(h.name, 0)) for h in s.scalars(select(Host))
        }

    def not_shared(self, s: Session, spec: VmSpec, *hosts: str) -> frozenset[str]:
        """The VM's datastores (its saved state's too) not marked shared on every one of
        ``hosts``: a datastore of the same name elsewhere is other storage."""
        used = {d.datastore for d in spec.disks}
        if spec.saved_state is not None:
            used.add(spec.saved_state.datastore)
        shared_on = []
        for name in hosts:
            row = s.scalars(select(Host).where(Host.name == name)).first()
            if row is None:
                continue  # refused as unknown anyway
            facts: dict[str, Any] = row.facts or {}
            shared_on.append({d["name"] for d in facts.get("datastores", ()) if d.get("shared")})
        return frozenset(u for u in used if not all(u in x for x in shared_on))

    @staticmethod
    def _host_view(host: Host, committed_mib: int) -> HostView:
        # Straight from the stored JSON (validated when it was stored): parsing whole fact
        # sheets for every host on every migration request would cost tens of milliseconds.
        f: dict[str, Any] = host.facts or {}
        return HostView(
            name=host.name,
            state=host.state,
            memory_mib=int(f.get("memory_bytes", 0)) >> 20,
            committed_mib=committed_mib,
            cpu_models=frozenset(f.get("cpu_models", ())),
            machine_types=frozenset(f.get("machine_types", ())),
            machine_aliases=dict(f.get("machine_aliases", {})),
            bridges=frozenset(f.get("bridges", ())),
            datastores=frozenset(d["name"] for d in f.get("datastores", ())),
            accel=str(f.get("accel", {}).get("name", "")),
            qemu_version=str(f.get("qemu_version", "")),
            peer_port=f.get("peer_port"),
            networks=tuple(
                NetworkView(
                    address=str(n["address"]),
                    prefixlen=int(n.get("prefixlen", 32)),
                    mtu=n.get("mtu"),
                    ifname=n.get("ifname"),
                )
                for n in f.get("migration_networks", ())
            ),
        )

    def cpu_baseline(self, s: Session) -> str:
        """The newest CPU model every host can run: VMs can then move anywhere (like EVC)."""
        facts = [HostFacts.model_validate(h.facts) for h in s.scalars(select(Host)) if h.facts]
        if any(f.accel.name == "tcg" for f in facts):
            return "qemu64"
        for model in CPU_PREFERENCE:
            if all(model in f.cpu_models for f in facts):
                return model
        return "qemu64"

    # ------------------------------------------------------------------ pools

    def set_pool(self, pool: PoolSet) -> None:
        if pool.last < pool.first:
            raise Invalid("pool: last address comes before first", field="last")
        self.db.set_setting("pool", pool.model_dump(mode="json"))

    def _allocate_address(self, s: Session) -> str | None:
        pool = self.db.setting("pool")
        if pool is None:
            return None
        used = {a.split("/")[0] for a in s.scalars(select(Vm.address)) if a}
        addr = ipaddress.IPv4Address(pool["first"])
        while addr <= ipaddress.IPv4Address(pool["last"]):
            if str(addr) not in used:
                return f"{addr}/{pool['prefixlen']}"
            addr += 1
        raise Conflict("the VM address pool is exhausted", field="address")

    @staticmethod
    def _allocate_mac(s: Session) -> str:
        used = set(s.scalars(select(Vm.mac)))
        while True:
            # 52:54:00 is QEMU's locally administered prefix; unique within the cluster.
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
            if mac not in used:
                return mac

    # ------------------------------------------------------------------ VMs

    def vm_by_name(self, s: Session, name: str) -> Vm:
        vm = s.scalars(select(Vm).where(Vm.name == name)).first()
        if vm is None:
            raise NotFound(f"no VM named {name!r}", vm=name)
        return vm

    def vm_out(self, s: Session, vm: Vm, migrating: bool | None = None) -> VmOut:
        """``migrating``: known by the caller (a page of VMs asks once for all of them)."""
        spec = VmSpec.model_validate(vm.spec)
        return VmOut(
            name=vm.name,
            uuid=vm.uuid,
            host=vm.host.name,
            state=vm.state,
            mac=vm.mac,
            address=vm.address,
            cpu_model=spec.cpu_model,
            machine=spec.machine,
            memory_mib=spec.memory,
            vcpus=spec.vcpus,
            migrating=migrating
            if migrating is not None
            else self.db.active_task_for_vm(s, vm.name) is not None,
            attention=vm.attention,
            disks=[
                DiskUsage(index=i, datastore=d.datastore, path=d.path, format=d.format)
                for i, d in enumerate(spec.disks)
            ],
        )

    def list_vms(self, limit: int | None = None, after: str | None = None) -> list[VmOut]:
        """By name; ``after``: only names after it (the next page's)."""
        query = select(Vm).order_by(Vm.name).limit(limit)
        if after is not None:
            query = query.where(Vm.name > after)
        with self.db.session() as s:
            rows = list(s.scalars(query.options(selectinload(Vm.host))))
            # The active tasks are few (a handful per host): all of them, not a lookup per VM.
            busy = set(s.scalars(select(Task.vm).where(Task.state.in_(ACTIVE_TASK_STATES))))
            return [self.vm_out(s, v, v.name in busy) for v in rows]

    def show_vm(self, name: str, refresh: bool = True) -> VmOut:
        with self.db.session() as s:
            vm = self.vm_by_name(s, name)
            if refresh and self.db.active_task_for_vm(s, name) is None:
                try:
                    info = self.call(vm.host, lambda c: c.vm(name), vm=name)
                    vm.state = info.state
                except (Upstream, NotFound) as exc:
                    log.warning("cannot refresh %s: %s", name, exc)
            out = self.vm_out(s, vm)
            if refresh and out.disks:
                # Sizes only the VM's host can read; without it, the definition's disks.
                try:
                    out.disks = self.call(vm.host, lambda c: c.disks(name), vm=name)
                except (Upstream, NotFound) as exc:
                    log.warning("cannot read the disks of %s: %s", name, exc)
            return out

    def create_vm(self, req: VmCreate) -> VmOut:
        with self.db.session() as s:
            if s.scalars(select(Vm).where(Vm.name == req.name)).first():
                raise Conflict(f"a VM named {req.name!r} already exists", field="name", vm=req.name)
            if req.host is None:
                raise Invalid("give the host (or let DRS place the VM)", field="host")
            host = self.host_by_name(s, req.host)
            if host.state != "up":
                raise Conflict(f"host {host.name} is {host.state}", field="host", host=host.name)
            committed = self.committed(s).get(host.name, 0)
            free = self._host_view(host, committed).memory_mib - HOST_RESERVED_MIB - committed
            if req.memory > free:
                raise Conflict(
                    f"host {host.name} has {max(free, 0)} MiB free for VMs; {req.name} needs "
                    f"{req.memory} MiB",
                    code="insufficient_memory",
                    field="memory",
                    host=host.name,
                )
            facts = HostFacts.model_validate(host.facts)
            address = str(req.address) if req.address else self._allocate_address(s)
            if address and s.scalars(select(Vm).where(Vm.address == address)).first():
                raise Conflict(f"address {address} is taken", field="address")
            mac = self._allocate_mac(s)
            # Pin the versioned machine type: every host must then offer exactly this one.
            machine = facts.machine_aliases.get("pc", "pc")
            guest = GuestConfig(ip=address) if address else GuestConfig()
            if req.workload:
                guest = guest.model_copy(
                    update={
                        "fill_mib": req.workload.fill_mib,
                        "dirty_mib_s": req.workload.dirty_mib_s,
                        "hot_mib": req.workload.hot_mib,
                        "disk_bulk_mib_s": req.workload.disk_mib_s,
                        "cpu_pct": req.workload.cpu_pct,
                    }
                )
            disks = []
            boot: KernelBoot | DiskBoot = KernelBoot()
            if req.image is not None and req.disk is not None:
                # A user's own guest: it boots from its copy of the image, no test program.
                disks.append(
                    image_disk(s, host, req.name, req.image, req.disk.datastore, req.disk.size_mib)
                )
                boot = DiskBoot()
            elif req.disk and req.disk.size_mib:
                disks.append(
                    Disk(
                        datastore=req.disk.datastore,
                        path=f"{req.name}.{req.disk.format}",
                        format=req.disk.format,
                        create_size=req.disk.size_mib << 20,
                    )
                )
            for extra in req.extra_disks:
                assert extra.size_mib is not None  # VmCreate refuses it otherwise
                disks.append(
                    Disk(
                        datastore=extra.datastore,
                        path=f"{req.name}/disk{len(disks)}.{extra.format}",
                        format=extra.format,
                        create_size=extra.size_mib << 20,
                    )
                )
            spec = VmSpec(
                name=req.name,
                uuid=uuid.uuid4(),
                memory=req.memory,
                vcpus=req.vcpus,
                cpu_model=self.cpu_baseline(s),
                machine=machine,
                boot=boot,
                nics=[Nic(mac=mac, bridge=VM_BRIDGE)],
                disks=disks,
                guest=guest if req.image is None else None,
                # A user's own guest learns its name and address at first boot.
                cloud_init=CloudInit(
                    hostname=req.name, address=address, user_data=req.user_data or ""
                )
                if req.image is not None
                else None,
            )
            # A VM from an image waits for its disk's full copy (minutes for a large image).
            self.call(
                host,
                lambda c: c.define(spec),
                vm=req.name,
                timeout_s=3600.0 if req.image else 120.0,
            )
            vm = Vm(
                name=req.name,
                uuid=str(spec.uuid),
                mac=mac,
                address=address,
                host=host,
                state="stopped",
                spec=spec.model_dump(mode="json"),
                memory_mib=spec.memory,
            )
            s.add(vm)
            try:
                s.flush()
            except IntegrityError as exc:
                # Another manager replica created a VM with this name or address meanwhile
                # (both read it free): the definition made here goes, and nothing is kept.
                with contextlib.suppress(ManagerError):
                    self.call(host, lambda c: c.delete(req.name, with_disks=True), vm=req.name)
                raise Conflict(
                    f"VM {req.name}: its name or address {address} was taken meanwhile by "
                    "another request; try again",
                    field="name",
                    vm=req.name,
                ) from exc
            out = self.vm_out(s, vm)
        if req.start:
            return self.start_vm(req.name)
        return out
