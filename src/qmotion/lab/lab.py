"""Bringing a lab up, and the handle on a lab that is up (hosts, clients, faults to inject).

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

The record is in ``record``, building the namespaces in ``build``, the manager, agents and
delay line in ``processes``, and ``lab down`` in ``teardown``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from qmotion.api.sizes import parse_rate_bytes
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ClientError
from qmotion.client.server import ServerClient
from qmotion.hypervisor import hugepages as hugepages_mod
from qmotion.image import ensure_image
from qmotion.lab import netns, postgres
from qmotion.lab.build import build, choose_subnet, validate
from qmotion.lab.errors import LabExists, LabInputError, LabNotFound, LabSetupError
from qmotion.lab.processes import (
    FIRST_REPLICA,
    agent_client,
    start_agent,
    start_manager,
    start_replica,
    stop_pid,
    wait_agent,
)
from qmotion.lab.record import AddressPool, LabHost, LabRecord, load_lab, record_path, save
from qmotion.lab.teardown import LAB_POSTGRES, teardown
from qmotion.paths import labs_dir

POOL_FIRST, POOL_LAST = 100, 199
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
        return agent_client(self.record, self.host(host), timeout_s)

    def namespace(self, name: str) -> str:
        if name in ("client", self.record.client_namespace):
            return self.record.client_namespace
        return self.host(name).namespace

    def server(self, timeout_s: float = 120.0) -> ServerClient:
        rec = self.record
        if rec.manager_url is None or rec.manager_token_file is None:
            raise LabNotFound(f"lab {rec.name} has no manager")
        token = Path(rec.manager_token_file).read_text().strip()
        return ServerClient(
            rec.manager_url, token, timeout_s=timeout_s, ca_file=rec.manager_ca_file
        )

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
        h.agent_pid = start_agent(self.record, h, accel)
        save(self.record)
        wait_agent(h, self.record)
        if self.record.manager_url is not None:
            # The manager's periodic refresh may have seen the host down meanwhile.
            with self.server() as client:
                client.refresh_hosts()

    def kill_agent(self, host: str, down_s: float = 0.0, accel: str = "auto") -> None:
        """SIGKILL a host's agent, as a crash (its VMs run on: each QEMU is a daemon of its
        own), and start it again after ``down_s`` seconds on the same state directory; returns
        once it answers."""
        h = self.host(host)
        stop_pid(h.agent_pid, b"agent", crash=True)
        try:
            time.sleep(down_s)
        finally:
            # Whatever cuts the outage short, the host gets its agent back.
            h.agent_pid = start_agent(self.record, h, accel)
            save(self.record)
        wait_agent(h, self.record)
        self._refresh_quietly()

    def revive(self, accel: str = "auto") -> list[str]:
        """Start again whatever of the lab's agents and manager is not running (after a fault
        test that ended midway); returns what it started."""
        started: list[str] = []
        for h in self.record.hosts:
            if not _running(h.agent_pid, b"agent"):
                h.agent_pid = start_agent(self.record, h, accel)
                save(self.record)
                wait_agent(h, self.record)
                started.append(h.name)
        if self.record.manager_url is not None and not _running(self.record.manager_pid, b"server"):
            start_manager(self.record, register=False)
            started.append("manager")
        return started

    def _refresh_quietly(self) -> None:
        """The manager's periodic refresh may have seen a host down meanwhile; a manager that
        is down itself refreshes when it is back."""
        if self.record.manager_url is None:
            return
        with contextlib.suppress(ClientError), self.server(timeout_s=30) as client:
            client.refresh_hosts()

    def start_replica(self, name: str) -> str:
        """Another manager replica on the lab's (PostgreSQL) database; its URL."""
        return start_replica(self.record, name).url

    def replica_pid(self, name: str) -> int | None:
        if name == FIRST_REPLICA:
            return self.record.manager_pid
        return next((r.pid for r in self.record.replicas if r.name == name), None)

    def kill_replica(self, name: str) -> None:
        """SIGKILL one manager replica (``m1`` is the lab's own): as a machine that dies."""
        stop_pid(self.replica_pid(name), b"server", crash=True)

    def restart_manager(self, crash: bool = False, down_s: float = 0.0) -> None:
        """Stop the manager (``crash``: SIGKILL, as a dying process) and start it again, after
        ``down_s`` seconds, on the same database and token; hosts and the pool stay
        registered."""
        stop_pid(self.record.manager_pid, b"server", crash=crash)
        time.sleep(down_s)
        start_manager(self.record, register=False)

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

    @contextlib.contextmanager
    def migration_link_down(self, host: str) -> Iterator[None]:
        """While inside, ``host``'s migration link is down at its switch port (``ip link set
        NAME-hIm down``): streams into and out of the host stop silently, as when a cable or a
        switch port fails. The host keeps its interface, address and routes (nothing falls
        back) and its agent still answers on the management network. Up again on exit."""
        h = self.host(host)
        if not h.migration_address:
            raise LabInputError(f"lab {self.record.name} has no migration network")
        port = f"{h.namespace}m"
        netns.set_link(None, port, up=False)
        try:
            yield
        finally:
            netns.set_link(None, port, up=True)

    @contextlib.contextmanager
    def migration_link_rate(self, host: str, rate_bytes: int) -> Iterator[None]:
        """While inside, ``host`` sends at most ``rate_bytes`` per second on its migration
        link: a slow link, which QEMU's own rate limit is not (QEMU lifts it for the final
        stop-and-copy). Back to the lab's own rate (``--bandwidth``), or none, on exit."""
        h = self.host(host)
        if not h.migration_address:
            raise LabInputError(f"lab {self.record.name} has no migration network")
        netns.limit_rate(h.namespace, "eth1", rate_bytes)
        try:
            yield
        finally:
            if self.record.bandwidth:
                netns.limit_rate(h.namespace, "eth1", parse_rate_bytes(self.record.bandwidth))
            else:
                netns.clear_rate(h.namespace, "eth1")

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


def _running(pid: int | None, what: bytes) -> bool:
    """``pid`` is alive (not a zombie, which is reaped) and is the lab's process ``what``."""
    if pid is None:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return what in cmdline


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
    postgres_db: bool = False,
    managers: int = 1,
    lease_s: float = 10.0,
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
    its memory kept for itself), so capacity checks in the lab are real. ``postgres_db``:
    the manager's database is a PostgreSQL the lab starts (in its directory, on a Unix
    socket); ``managers``: that many manager replicas on it (m1, m2, ...), ``lease_s``
    their lease.
    """
    if managers < 1 or (managers > 1 and not postgres_db):
        raise LabInputError("managers: 1, or more with postgres_db (replicas share it)")
    validate(name, hosts, rtt_ms, bandwidth)
    if hugepages is not None and hugepages < 0:
        raise LabInputError(f"hugepages must be >= 0 bytes, got {hugepages}")
    if record_path(name).exists():
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
    k = choose_subnet()
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
        lease_s=lease_s,
    )
    try:
        if postgres_db:
            cluster = postgres.start(lab_dir / LAB_POSTGRES)
            rec.postgres_dir, rec.db_url = str(cluster.directory), cluster.url
            save(rec)
        build(rec, hosts, accel, small_datastore_mib)
        for k in range(2, managers + 1):
            start_replica(rec, f"m{k}")
    except BaseException as exc:
        teardown(rec)
        if isinstance(exc, Exception):
            raise LabSetupError(f"lab up failed and was rolled back: {exc}") from exc
        raise
    return Lab(rec)


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
