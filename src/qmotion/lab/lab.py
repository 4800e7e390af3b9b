"""Bringing a lab up and down, and the record that lets any later command find its parts.

Layout of lab NAME with subnet 198.18.K.0/24 (addresses only in 198.18.0.0/15):
  root namespace: switch bridge ``NAME-sw`` with .1 (the manager and the CLI reach agents here)
  ``NAME-client``: a probe namespace at .2
  ``NAME-hI``: host I at .(10+I) on its VM bridge ``vmbr0``, whose uplink is a veth to the switch;
              guests' taps join ``vmbr0``, so every VM is on the one L2 segment wherever it runs
  VM address pool: .100 - .199
  with ``--migration-net``: switch ``NAME-msw`` (198.19.K.0/24), each host's ``eth1`` at
              198.19.K.(10+I), the address its agent receives migrations on
The record is written before each resource is made, so ``lab down`` can always undo a partial
``lab up``; what is not in the record is still found by the lab's name prefix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from qmotion.api.server import HostRegister, PoolSet
from qmotion.api.sizes import parse_rate_bytes
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ClientError
from qmotion.client.server import ServerClient
from qmotion.hypervisor import hugepages as hugepages_mod
from qmotion.image import ensure_image
from qmotion.image.cc import compile_static
from qmotion.lab import netns
from qmotion.lab.errors import LabExists, LabInputError, LabNotFound, LabSetupError
from qmotion.paths import labs_dir

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
AGENT_PORT = 8100
MANAGER_PORT = 8000
MAX_HOSTS = 50
POOL_FIRST, POOL_LAST = 100, 199
AGENT_READY_TIMEOUT_S = 60.0
# Two 1 GiB guests (a source and its destination) plus a few small ones.
HUGEPAGES_DEFAULT = 3 << 30


def machine_memory() -> int:
    """The machine's memory in bytes (0 if unknown)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    m = re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M)
    return int(m.group(1)) << 10 if m else 0


def default_hugepages() -> int:
    """The lab's huge-page pool: 3 GiB, at most a quarter of the machine's memory."""
    return min(HUGEPAGES_DEFAULT, machine_memory() // 4)


class LabHost(BaseModel):
    name: str
    namespace: str
    address: str
    agent_url: str
    token_file: str
    state_dir: str
    run_dir: str
    local_datastore: str
    agent_pid: int | None = None
    migration_address: str | None = None
    # Overrides the lab's choice, e.g. to mix hosts with and without a huge-page pool.
    hugepages: bool | None = None


class LabDatastore(BaseModel):
    name: str
    path: str
    shared: bool
    hosts: list[str]
    size_mib: int | None = Field(default=None, description="a tmpfs of this size (else the disk)")


class AddressPool(BaseModel):
    first: str
    last: str
    prefixlen: int


class LabRecord(BaseModel):
    name: str
    dir: str
    subnet: str
    switch: str
    switch_address: str
    client_namespace: str
    client_address: str
    hosts: list[LabHost] = Field(default_factory=list)
    datastores: list[LabDatastore] = Field(default_factory=list)
    pool: AddressPool
    rtt_ms: float = 0.0
    bandwidth: str | None = None
    migration_subnet: str | None = None
    insecure: bool = False  # plaintext migration streams (no cluster CA)
    created_at: datetime
    links: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    ready: bool = False
    wire_pid: int | None = None
    manager_url: str | None = None
    manager_token_file: str | None = None
    manager_pid: int | None = None
    hugepages: bool = True
    # What each host offers VMs (its agent's --cpus/--memory); None: the whole machine.
    host_cpus: int | None = None
    host_memory_mib: int | None = None

    def public(self) -> dict[str, object]:
        """The ``lab status --json`` view: no secrets (tokens stay in their files)."""
        return {
            "name": self.name,
            "subnet": self.subnet,
            "ready": self.ready,
            "switch": {"bridge": self.switch, "address": self.switch_address},
            "hosts": [
                {
                    "name": h.name,
                    "namespace": h.namespace,
                    "address": h.address,
                    "migration_address": h.migration_address,
                    "agent_url": h.agent_url,
                    "token_file": h.token_file,
                    "agent_pid": h.agent_pid,
                    "local_datastore": h.local_datastore,
                }
                for h in self.hosts
            ],
            "client": {"namespace": self.client_namespace, "address": self.client_address},
            "datastores": [d.model_dump() for d in self.datastores],
            "address_pool": self.pool.model_dump(),
            "manager": {
                "url": self.manager_url,
                "token_file": self.manager_token_file,
                "pid": self.manager_pid,
            },
            "rtt_ms": self.rtt_ms,
            "bandwidth": self.bandwidth,
            "migration_subnet": self.migration_subnet,
            "tls": not self.insecure,
            "host_cpus": self.host_cpus,
            "host_memory_mib": self.host_memory_mib,
            "created_at": self.created_at.isoformat(),
        }


def _record_path(name: str) -> Path:
    return labs_dir() / name / "lab.json"


def _save(rec: LabRecord) -> None:
    path = Path(rec.dir) / "lab.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.model_dump_json(indent=2))
    os.replace(tmp, path)


def load_lab(name: str) -> LabRecord:
    path = _record_path(name)
    if not path.is_file():
        raise LabNotFound(f"no lab named {name!r} is up (looked for {path})")
    return LabRecord.model_validate_json(path.read_text())


@dataclass
class Lab:
    """A lab that is up: its record plus conveniences for tests and the demo."""

    record: LabRecord

    @classmethod
    def load(cls, name: str) -> Lab:
        return cls(load_lab(name))

    def host(self, name: str) -> LabHost:
        for h in self.record.hosts:
            if name in (h.name, h.namespace):
                return h
        raise LabNotFound(f"lab {self.record.name} has no host {name!r}")

    def agent(self, host: str, timeout_s: float = 120.0) -> AgentClient:
        h = self.host(host)
        return AgentClient(h.agent_url, Path(h.token_file).read_text().strip(), timeout_s=timeout_s)

    def namespace(self, name: str) -> str:
        if name in ("client", self.record.client_namespace):
            return self.record.client_namespace
        return self.host(name).namespace

    def server(self, timeout_s: float = 120.0) -> ServerClient:
        rec = self.record
        if rec.manager_url is None or rec.manager_token_file is None:
            raise LabNotFound(f"lab {rec.name} has no manager")
        token = Path(rec.manager_token_file).read_text().strip()
        return ServerClient(rec.manager_url, token, timeout_s=timeout_s)

    def restart_agent(self, host: str, accel: str = "auto", hugepages: bool | None = None) -> None:
        """Stop a host's agent (its VMs keep running) and start it again.

        ``hugepages`` set: from now on this host's agent does (or does not) back guests from
        the huge-page pool.
        """
        h = self.host(host)
        if hugepages is not None:
            h.hugepages = hugepages
        if h.agent_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.agent_pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{h.agent_pid}").exists() and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(h.agent_pid, os.WNOHANG)
                time.sleep(0.05)
        h.agent_pid = _start_agent(self.record, h, accel)
        _save(self.record)
        _wait_agent(h)
        if self.record.manager_url is not None:
            # The manager's periodic refresh may have seen the host down meanwhile.
            with self.server() as client:
                client.refresh_hosts()

    def restart_manager(self, crash: bool = False, down_s: float = 0.0) -> None:
        """Stop the manager (``crash``: SIGKILL, as a dying process) and start it again, after
        ``down_s`` seconds, on the same database and token; hosts and the pool stay
        registered."""
        _stop_pid(self.record.manager_pid, b"server", crash=crash)
        time.sleep(down_s)
        _start_manager(self.record, register=False)

    @contextlib.contextmanager
    def migration_link_cut(self, host: str) -> Iterator[None]:
        """While inside, migration streams into ``host`` are silently dropped (its agent still
        answers): a link that fails in the middle of a migration. Restored on exit."""
        h = self.host(host)
        # Whichever network the stream takes: the migration network's, else the management.
        dev = "eth1" if h.migration_address else "eth0"
        netns.drop_incoming_tcp_high_ports(h.namespace, dev)
        try:
            yield
        finally:
            netns.clear_fault(h.namespace, dev)

    @contextlib.contextmanager
    def migration_network_down(self, host: str) -> Iterator[None]:
        """While inside, ``host``'s migration interface is down (its agent still answers on
        the management network): migrations into it must fall back. Restored on exit."""
        h = self.host(host)
        if not h.migration_address:
            raise LabInputError(f"lab {self.record.name} has no migration network")
        netns.set_link(h.namespace, "eth1", up=False)
        try:
            yield
        finally:
            netns.set_link(h.namespace, "eth1", up=True)

    def set_migration_mtu(self, host: str, mtu: int) -> None:
        """The MTU of ``host``'s migration interface and of its switch port (jumbo frames)."""
        h = self.host(host)
        netns.set_link(h.namespace, "eth1", mtu=mtu)
        netns.set_link(None, f"{h.namespace}m", mtu=mtu)

    def pool_address(self, index: int) -> str:
        """The ``index``-th address of the VM pool, with prefix length (e.g. 198.18.1.100/24)."""
        first = ipaddress.IPv4Address(self.record.pool.first)
        last = ipaddress.IPv4Address(self.record.pool.last)
        addr = first + index
        if addr > last:
            raise LabInputError(f"address pool exhausted at index {index}")
        return f"{addr}/{self.record.pool.prefixlen}"


def _choose_subnet() -> int:
    used: set[int] = set()
    root = labs_dir()
    if root.is_dir():
        for rec_file in root.glob("*/lab.json"):
            with contextlib.suppress(ValueError, OSError):
                rec = LabRecord.model_validate_json(rec_file.read_text())
                used.add(int(rec.subnet.split(".")[2]))
    for addr in netns.root_addresses():
        parts = addr.split(".")
        if parts[:2] in (["198", "18"], ["198", "19"]):
            used.add(int(parts[2]))
    for k in range(1, 255):
        if k not in used:
            return k
    raise LabSetupError("no free /24 left in 198.18.0.0/16 for a new lab")


def _validate(name: str, hosts: int, rtt_ms: float, bandwidth: str | None) -> None:
    if not NAME_RE.match(name):
        raise LabInputError(
            f"lab name {name!r}: 1-8 characters, lowercase letters and digits, starting with a "
            "letter (it prefixes every namespace and link the lab makes)"
        )
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabInputError(f"--hosts must be between 1 and {MAX_HOSTS}, got {hosts}")
    if not 0 <= rtt_ms <= 2000:
        raise LabInputError(f"--rtt-ms must be between 0 and 2000, got {rtt_ms}")
    if bandwidth is not None:
        try:
            parse_rate_bytes(bandwidth)
        except ValueError as exc:
            raise LabInputError(f"--bandwidth: {exc}") from exc


def lab_up(
    name: str = "qmlab",
    hosts: int = 3,
    *,
    rtt_ms: float = 0.0,
    bandwidth: str | None = None,
    accel: str = "auto",
    hugepages: int | None = None,
    migration_net: bool = False,
    insecure: bool = False,
    small_datastore_mib: int | None = None,
    host_cpus: int | None = None,
    host_memory_mib: int | None = None,
) -> Lab:
    """Create the lab and start an agent per host; on any failure, tear down what was made.

    ``hugepages``: bytes of the host's huge-page pool the lab's guests may use (the pool is
    grown and warmed to that size; it is never shrunk, see hypervisor.hugepages); None for the
    default, 0 to run guests from ordinary memory. ``migration_net``: a second switch that
    carries migration streams (hosts still reach each other on the first). ``insecure``:
    the manager runs without a cluster CA (plaintext migration streams).
    ``small_datastore_mib``: also a shared datastore ``small`` of that size (a tmpfs), for
    what must withstand a datastore that fills up. ``host_cpus``, ``host_memory_mib``:
    what each host offers VMs; by default the machine divided among the hosts (a quarter of
    its memory kept for itself), so capacity checks in the lab are real.
    """
    _validate(name, hosts, rtt_ms, bandwidth)
    if hugepages is not None and hugepages < 0:
        raise LabInputError(f"hugepages must be >= 0 bytes, got {hugepages}")
    if _record_path(name).exists():
        raise LabExists(f"lab {name!r} is already up; run `qmotion lab down --name {name}` first")
    leftovers = [n for n in netns.namespaces() if n.startswith(f"{name}-")]
    if leftovers or netns.links_with_prefix(f"{name}-"):
        raise LabExists(
            f"namespaces or links of a lab {name!r} exist without a record ({leftovers}); "
            f"run `qmotion lab down --name {name}` to sweep them"
        )
    # Build the guest before the agents start, so three agents do not all wait on one build.
    ensure_image()
    pool_bytes = default_hugepages() if hugepages is None else hugepages
    if pool_bytes:
        try:
            hugepages_mod.ensure_pool(pool_bytes)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise LabSetupError(
                f"cannot reserve {pool_bytes >> 20} MiB of huge pages: {exc}"
            ) from exc
    lab_dir = labs_dir() / name
    lab_dir.mkdir(parents=True, exist_ok=False)
    k = _choose_subnet()
    net = f"198.18.{k}"
    rec = LabRecord(
        name=name,
        dir=str(lab_dir),
        subnet=f"{net}.0/24",
        switch=f"{name}-sw",
        switch_address=f"{net}.1",
        client_namespace=f"{name}-client",
        client_address=f"{net}.2",
        pool=AddressPool(first=f"{net}.{POOL_FIRST}", last=f"{net}.{POOL_LAST}", prefixlen=24),
        rtt_ms=rtt_ms,
        bandwidth=bandwidth,
        migration_subnet=f"198.19.{k}.0/24" if migration_net else None,
        insecure=insecure,
        created_at=datetime.now(UTC),
        hugepages=bool(pool_bytes),
        host_cpus=host_cpus or max(1, (os.cpu_count() or 1) // hosts),
        host_memory_mib=host_memory_mib or (machine_memory() * 3 // 4 // hosts) >> 20 or None,
    )
    try:
        _build(rec, hosts, accel, small_datastore_mib)
    except BaseException as exc:
        _teardown(rec)
        if isinstance(exc, Exception):
            raise LabSetupError(f"lab up failed and was rolled back: {exc}") from exc
        raise
    return Lab(rec)


def _build(rec: LabRecord, hosts: int, accel: str, small_datastore_mib: int | None) -> None:
    lab_dir = Path(rec.dir)
    _save(rec)
    rec.links.append(rec.switch)
    _save(rec)
    netns.create_bridge(None, rec.switch)
    netns.disable_ipv6(None, rec.switch)
    netns.add_address(None, rec.switch, rec.switch_address, 24)

    rec.namespaces.append(rec.client_namespace)
    rec.links.append(f"{rec.name}-c")
    _save(rec)
    netns.create_ns(rec.client_namespace)
    netns.veth(f"{rec.name}-c", None, "eth0", rec.client_namespace)
    netns.enslave(None, f"{rec.name}-c", rec.switch)
    netns.add_address(rec.client_namespace, "eth0", rec.client_address, 24)

    wan = f"{rec.name}-wan" if rec.rtt_ms > 0 else None
    if wan is not None:
        rec.namespaces.append(wan)
        _save(rec)
        netns.create_ns(wan)

    shared = lab_dir / "datastores" / "shared"
    shared.mkdir(parents=True)
    rec.datastores.append(
        LabDatastore(
            name="shared",
            path=str(shared),
            shared=True,
            hosts=[f"h{i}" for i in range(1, hosts + 1)],
        )
    )
    if small_datastore_mib is not None:
        small = lab_dir / "datastores" / "small"
        small.mkdir(parents=True)
        rec.datastores.append(
            LabDatastore(
                name="small",
                path=str(small),
                shared=True,
                hosts=[f"h{i}" for i in range(1, hosts + 1)],
                size_mib=small_datastore_mib,
            )
        )
        _save(rec)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={small_datastore_mib}m", "tmpfs", str(small)],
            check=True,
            capture_output=True,
        )
    net = rec.switch_address.rsplit(".", 1)[0]
    mig_switch = f"{rec.name}-msw" if rec.migration_subnet else None
    if mig_switch is not None:
        rec.links.append(mig_switch)
        _save(rec)
        netns.create_bridge(None, mig_switch)
        netns.disable_ipv6(None, mig_switch)
    pairs: list[str] = []
    for i in range(1, hosts + 1):
        hname = f"h{i}"
        ns = f"{rec.name}-{hname}"
        hdir = lab_dir / "hosts" / hname
        hdir.mkdir(parents=True)
        token_file = hdir / "token"
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
        local = lab_dir / "datastores" / f"local-{hname}"
        local.mkdir(parents=True)
        rec.datastores.append(
            LabDatastore(name=f"local-{hname}", path=str(local), shared=False, hosts=[hname])
        )
        address = f"{net}.{10 + i}"
        host = LabHost(
            name=hname,
            namespace=ns,
            address=address,
            agent_url=f"http://{address}:{AGENT_PORT}",
            token_file=str(token_file),
            state_dir=str(hdir / "agent"),
            run_dir=f"/run/qmotion/{rec.name}-{hname}",
            local_datastore=f"local-{hname}",
        )
        rec.hosts.append(host)
        rec.namespaces.append(ns)
        rec.links.append(ns)
        _save(rec)
        netns.create_ns(ns)
        if wan is None:
            netns.veth(ns, None, "eth0", ns)
        else:
            # Host uplink -> the wan namespace's delay line -> switch port.
            netns.veth(ns, None, f"{hname}b", wan)
            netns.veth(f"{hname}a", wan, "eth0", ns)
            pairs.append(f"{hname}a:{hname}b")
        netns.enslave(None, ns, rec.switch)
        netns.create_bridge(ns, "vmbr0")
        netns.enslave(ns, "eth0", "vmbr0")
        netns.add_address(ns, "vmbr0", address, 24)
        if rec.bandwidth:
            netns.limit_rate(ns, "eth0", parse_rate_bytes(rec.bandwidth))
        if mig_switch is not None and rec.migration_subnet is not None:
            mnet = rec.migration_subnet.rsplit(".", 1)[0]
            host.migration_address = f"{mnet}.{10 + i}"
            rec.links.append(f"{ns}m")
            _save(rec)
            if wan is None:
                netns.veth(f"{ns}m", None, "eth1", ns)
            else:
                netns.veth(f"{ns}m", None, f"{hname}mb", wan)
                netns.veth(f"{hname}ma", wan, "eth1", ns)
                pairs.append(f"{hname}ma:{hname}mb")
            netns.enslave(None, f"{ns}m", mig_switch)
            netns.add_address(ns, "eth1", host.migration_address, 24)
            if rec.bandwidth:
                netns.limit_rate(ns, "eth1", parse_rate_bytes(rec.bandwidth))
    if wan is not None:
        rec.wire_pid = _start_wire(rec, wan, pairs)
        _save(rec)
    for host in rec.hosts:
        host.agent_pid = _start_agent(rec, host, accel)
        _save(rec)
    for host in rec.hosts:
        _wait_agent(host)
    _start_manager(rec)
    rec.ready = True
    _save(rec)


def _start_manager(rec: LabRecord, register: bool = True) -> None:
    """The lab's manager runs in the root namespace, on the switch address. ``register``:
    a new manager (new token), which then learns the hosts and the address pool."""
    lab_dir = Path(rec.dir)
    token_file = lab_dir / "manager.token"
    if register:
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    rec.manager_url = f"http://{rec.switch_address}:{MANAGER_PORT}"
    rec.manager_token_file = str(token_file)
    argv = [
        sys.executable,
        "-m",
        "qmotion",
        "server",
        "--listen",
        f"{rec.switch_address}:{MANAGER_PORT}",
        "--db",
        f"sqlite:///{lab_dir / 'manager.db'}",
        "--token-file",
        str(token_file),
        *(["--insecure"] if rec.insecure else ["--ca-dir", str(lab_dir / "ca")]),
    ]
    with open(lab_dir / "manager.log", "ab") as logf:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
    rec.manager_pid = proc.pid
    _save(rec)
    token = token_file.read_text().strip()
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
    with ServerClient(rec.manager_url, token, timeout_s=60) as client:
        while True:
            try:
                client.hosts()
                break
            except ClientError as exc:
                if time.monotonic() > deadline or proc.poll() is not None:
                    tail = (lab_dir / "manager.log").read_text(errors="replace")[-1500:]
                    raise LabSetupError(f"manager did not start: {exc}\n{tail}") from exc
                time.sleep(0.2)
        if not register:
            return
        for h in rec.hosts:
            client.register_host(
                HostRegister(
                    name=h.name,
                    agent_url=h.agent_url,
                    token=Path(h.token_file).read_text().strip(),
                )
            )
        client.set_pool(
            PoolSet(first=rec.pool.first, last=rec.pool.last, prefixlen=rec.pool.prefixlen)
        )


def _start_wire(rec: LabRecord, wan: str, pairs: list[str]) -> int:
    """The delay line: half the RTT on each host's egress (this kernel may lack sch_netem)."""
    source = resources.files("qmotion.lab").joinpath("qmwire.c").read_bytes()
    binary = compile_static("qmwire", source)
    delay_us = int(rec.rtt_ms * 1000 / 2)
    log = open(Path(rec.dir) / "wire.log", "ab")  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", wan, str(binary), str(delay_us), *pairs],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    time.sleep(0.2)
    if proc.poll() is not None:
        raise LabSetupError(f"delay line exited: {(Path(rec.dir) / 'wire.log').read_text()[-500:]}")
    return proc.pid


def _start_agent(rec: LabRecord, host: LabHost, accel: str) -> int:
    argv = [
        "ip",
        "netns",
        "exec",
        host.namespace,
        sys.executable,
        "-m",
        "qmotion",
        "agent",
        "--name",
        host.name,
        "--listen",
        f"{host.address}:{AGENT_PORT}",
        "--token-file",
        host.token_file,
        "--state-dir",
        host.state_dir,
        "--run-dir",
        host.run_dir,
        "--accel",
        accel,
        "--hugepages"
        if (rec.hugepages if host.hugepages is None else host.hugepages)
        else "--no-hugepages",
    ]
    if host.migration_address:
        argv += ["--migration-address", host.migration_address]
    if rec.host_cpus:
        argv += ["--cpus", str(rec.host_cpus)]
    if rec.host_memory_mib:
        argv += ["--memory", f"{rec.host_memory_mib}M"]
    for ds in rec.datastores:
        if host.name in ds.hosts:
            argv += ["--datastore", f"{ds.name}={ds.path}" + (":shared" if ds.shared else "")]
    logf = open(Path(host.state_dir).parent / "agent.log", "ab")  # noqa: SIM115
    with logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    return proc.pid


def _wait_agent(host: LabHost) -> None:
    token = Path(host.token_file).read_text().strip()
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with AgentClient(host.agent_url, token, timeout_s=30) as client:
                client.host()
            return
        except (ClientError, httpx.HTTPError) as exc:
            last = exc
            time.sleep(0.2)
    log_file = Path(host.state_dir).parent / "agent.log"
    tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
    raise LabSetupError(f"agent on {host.name} did not become ready: {last}\n{tail}")


def _stop_pid(pid: int | None, what: bytes, crash: bool = False) -> None:
    """End a lab process outside its namespaces, only if the PID is still that process
    (``crash``: SIGKILL at once, as a process dying)."""
    if pid is None:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if what not in cmdline:
        return
    for sig in (signal.SIGKILL,) if crash else (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(50):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)


def _teardown(rec: LabRecord) -> None:
    _stop_pid(rec.manager_pid, b"server")
    for ns in rec.namespaces:
        if ns in netns.namespaces():
            netns.kill_ns_processes(ns)
    for ns in rec.namespaces:
        netns.delete_ns(ns)
    for link in rec.links:
        netns.delete_link(link)
    for host in rec.hosts:
        shutil.rmtree(host.run_dir, ignore_errors=True)
    _unmount_under(Path(rec.dir))
    shutil.rmtree(rec.dir, ignore_errors=True)


def _unmount_under(directory: Path) -> None:
    """File systems the lab mounted (a small datastore's tmpfs) go before its directory."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = f"{directory.resolve()}/"
    for line in reversed(mounts):
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def lab_down(name: str = "qmlab") -> list[str]:
    """Tear the lab down; also sweeps parts found by prefix when the record is gone.

    Returns what was removed, for the operator to see.
    """
    if not NAME_RE.match(name):
        raise LabInputError(f"lab name {name!r} is not a valid lab name")
    removed: list[str] = []
    path = _record_path(name)
    rec: LabRecord | None = None
    if path.is_file():
        with contextlib.suppress(ValueError):
            rec = LabRecord.model_validate_json(path.read_text())
    prefix = f"{name}-"
    namespaces = sorted(
        {*(rec.namespaces if rec else []), *(n for n in netns.namespaces() if n.startswith(prefix))}
    )
    links = sorted({*(rec.links if rec else []), *netns.links_with_prefix(prefix)})
    if rec is None and not namespaces and not links and not path.parent.exists():
        raise LabNotFound(f"no lab named {name!r} is up")
    if rec is not None:
        _stop_pid(rec.manager_pid, b"server")
    for ns in namespaces:
        if ns in netns.namespaces():
            netns.kill_ns_processes(ns)
    for ns in namespaces:
        netns.delete_ns(ns)
        removed.append(f"namespace {ns}")
    for link in links:
        netns.delete_link(link)
        removed.append(f"link {link}")
    for run_dir in Path("/run/qmotion").glob(f"{name}-*"):
        shutil.rmtree(run_dir, ignore_errors=True)
    if path.parent.exists():
        _unmount_under(path.parent)
        shutil.rmtree(path.parent, ignore_errors=True)
        removed.append(f"directory {path.parent}")
    return removed


def status(name: str) -> dict[str, object]:
    rec = load_lab(name)
    out = rec.public()
    alive = {}
    for h in rec.hosts:
        alive[h.name] = h.agent_pid is not None and Path(f"/proc/{h.agent_pid}").exists()
    out["agents_alive"] = alive
    return out


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)
