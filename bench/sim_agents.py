"""Light simulated host agents for the manager's scale bench, served in-process to its seam.

``SimCluster.transport`` is an ``AgentConnector`` transport factory: each agent URL gets an
``httpx.MockTransport`` that answers the routes the manager calls on the happy path (facts,
metrics, VM listing, and a live migration from the route probe to the source's release), in
the agent API's shapes (qmotion.api.*), from plain dicts kept per host.

Why not tests.unit.agent_world: every request there advances a simulated clock over every VM
of every host and observes every host (``Cluster._tick``, ``_observe``), all behind one lock:
O(VMs) per request, so a 1000-host refresh would cost the world far more than the manager.
Here a request touches its own host and, for a migration, its own record.

Time is wall time, as on real agents: a migration is ``active`` for 1-3 s after ``migrate``
(by the VM's name, so a run repeats) and completed once that has passed, looked at lazily
when a request touches it. Calls that block a real agent block here too, in the caller's
thread: the progress long-poll (``wait_ms`` until the status changes), the dirty-rate sample
and the path probe's upload (their seconds), the word to a destination still loading
(``finish`` with ``wait_ms``); every request first waits ``latency_s`` (network and agent).
So the manager's worker threads are held as long as real agents would hold them.

What the simulation spends in CPU is counted per thread (``sim_cpu``), so the bench can
subtract it from the manager's own process time.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from qmotion.api.host import AccelInfo, HostFacts
from qmotion.api.vm import Nic, VmSpec

DOMAIN = "sim.invalid"
MIB = 1 << 20
CPU_MODEL = "qemu64"
MACHINE = "pc-i440fx-10.0"
LINK_BPS = 1.25e9  # 10 GbE: what the path probe reports
RTT_MS = 0.2
FINAL = ("completed", "failed", "cancelled")


def agent_url(host: str) -> str:
    return f"http://{host}.{DOMAIN}:7100"


def host_of(url: str) -> str:
    return str(httpx.URL(url).host).removesuffix(f".{DOMAIN}")


def vm_spec(name: str, index: int, memory_mib: int, vcpus: int) -> VmSpec:
    """A VM as the manager would have defined it: no disks (nothing to copy or compare),
    one NIC on the hosts' bridge, the cluster's CPU model and versioned machine type."""
    mac = f"52:54:{index >> 24 & 0xFF:02x}:{index >> 16 & 0xFF:02x}:"
    mac += f"{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"
    return VmSpec(
        name=name,
        memory=memory_mib,
        vcpus=vcpus,
        cpu_model=CPU_MODEL,
        machine=MACHINE,
        nics=[Nic(mac=mac)],
    )


@dataclass
class SimVm:
    name: str
    spec: dict[str, Any]  # VmSpec, JSON mode: served as is
    memory_mib: int
    cpu_percent: float  # its typical load (% of one CPU); metrics vary around it
    runstate: str = "running"  # QEMU's: running, inmigrate, paused, postmigrate; gone
    incoming: str | None = None  # the migration it arrives by, until confirmed (keep-disks)
    arrived: str | None = None
    outgoing: str | None = None
    ran: bool = False  # ran here: never removed as a failed destination


@dataclass
class SimMigration:
    id: str
    vm: str
    source: str
    destination: str
    total: int
    duration_s: float
    start: str = "paused"  # the destination's: runs on the word (the source gives it)
    status: str = "setup"
    issued: float = 0.0


@dataclass
class SimHost:
    name: str
    cpus: int
    memory_bytes: int
    facts: bytes  # HostFacts, encoded once: facts do not change
    vms: dict[str, SimVm] = field(default_factory=dict)


class SimCluster:
    """Hosts, their VMs and the migrations between them, behind one lock held only for dict
    work (never across a wait). ``latency_s``: what each request costs before the agent
    answers; ``durations``: the range a migration's active time is drawn from."""

    def __init__(self, latency_s: float = 0.001, durations: tuple[float, float] = (1.0, 3.0)):
        self.latency_s, self.durations = latency_s, durations
        self.hosts: dict[str, SimHost] = {}
        self.migrations: dict[str, SimMigration] = {}
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.unhandled: Counter[str] = Counter()  # routes the manager called that are not here
        self.in_flight: dict[str, set[str]] = {}  # host -> migration ids touching it now
        self.max_in_flight: dict[str, int] = {}
        self._cpu: dict[int, float] = {}
        self._transports: dict[str, httpx.MockTransport] = {}
        self._tick = 0

    # ------------------------------------------------------------------ setting up

    def add_host(self, name: str, cpus: int = 32, memory_gib: int = 256) -> None:
        facts = HostFacts(
            name=name,
            cpu_model=CPU_MODEL,
            cpu_flags=[],
            cpus=cpus,
            memory_bytes=memory_gib << 30,
            qemu_version="10.0.2",
            machine_types=[MACHINE],
            machine_aliases={"pc": MACHINE},
            cpu_models=[CPU_MODEL],
            accel=AccelInfo(name="kvm", reason="simulated"),
            bridges=["vmbr0"],
            datastores=[],
            agent_version="sim",
        )
        body = json.dumps(facts.model_dump(mode="json")).encode()
        self.hosts[name] = SimHost(name, cpus, memory_gib << 30, body)
        self.in_flight[name] = set()

    def add_vm(self, host: str, spec: VmSpec, cpu_percent: float) -> None:
        self.hosts[host].vms[spec.name] = SimVm(
            spec.name, spec.model_dump(mode="json"), spec.memory, cpu_percent
        )

    def build(self, hosts: int, vms_per_host: int) -> list[tuple[str, VmSpec]]:
        """``hosts`` hosts ``h0000``.. with ``vms_per_host`` running VMs each (``vm00000``..,
        1-4 GiB, 1-4 vCPUs); a tenth of the hosts run busy guests (80 % of a vCPU each, the
        others 10-30 %), so DRS has an imbalance to plan away. The VMs, by host, in order."""
        out = []
        for i in range(hosts * vms_per_host):
            host = f"h{i // vms_per_host:04d}"
            if host not in self.hosts:
                self.add_host(host)
            spec = vm_spec(f"vm{i:05d}", i, 1024 * (1 + i % 4), 1 + i % 4)
            busy = i // vms_per_host < max(hosts // 10, 1)
            self.add_vm(host, spec, 80.0 if busy else 10.0 + (i * 37) % 21)
            out.append((host, spec))
        for h in range(hosts):  # a host with no VMs is a host too
            if f"h{h:04d}" not in self.hosts:
                self.add_host(f"h{h:04d}")
        return out

    def transport(self, url: str) -> httpx.BaseTransport:
        """The ``AgentConnector`` factory: one stateless transport per agent URL, kept."""
        t = self._transports.get(url)
        if t is None:
            host = host_of(url)
            t = self._transports[url] = httpx.MockTransport(lambda r: self._handle(host, r))
        return t

    # ------------------------------------------------------------------ what the bench reads

    def sim_cpu(self, thread: int | None = None) -> float:
        """CPU seconds the simulation spent: in one thread (its ident), or in all."""
        with self.lock:
            if thread is not None:
                return self._cpu.get(thread, 0.0)
            return sum(self._cpu.values())

    def max_concurrent(self) -> int:
        with self.lock:
            return max(self.max_in_flight.values(), default=0)

    def copies(self) -> dict[str, list[str]]:
        """VM -> hosts whose QEMU runs it now (exactly one each when all is well)."""
        with self.lock:
            self._settle_all(time.monotonic())
            out: dict[str, list[str]] = {}
            for h in self.hosts.values():
                for v in h.vms.values():
                    if v.runstate == "running":
                        out.setdefault(v.name, []).append(h.name)
            return out

    # ------------------------------------------------------------------ the seam

    def _handle(self, host: str, req: httpx.Request) -> httpx.Response:
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        me = threading.get_ident()
        t0 = time.thread_time()
        try:
            return self._route(host, req)
        finally:
            spent = time.thread_time() - t0
            with self.lock:
                self._cpu[me] = self._cpu.get(me, 0.0) + spent

    def _route(self, host: str, req: httpx.Request) -> httpx.Response:
        method, parts = req.method, req.url.path.strip("/").split("/")
        # Counted by route, the VM's name left out: which calls a round makes, how often.
        shape = parts[:2] + (
            ["{vm}", *parts[3:]] if len(parts) > 2 and parts[1] == "vms" else parts[2:]
        )
        key = f"{method} /{'/'.join(shape)}"
        with self.lock:
            self.requests[key] += 1
        if parts[0] != "v1" or host not in self.hosts:
            return _error(404, "not_found", f"no route {req.url.path}")
        h = self.hosts[host]
        body: dict[str, Any] = json.loads(req.content) if req.content else {}
        params = req.url.params
        if parts[1:] == ["host"]:
            return _raw(h.facts)
        if parts[1:] == ["metrics"]:
            return _json(self._metrics(h))
        if parts[1:] == ["vms"] and method == "GET":
            with self.lock:
                self._settle_all(time.monotonic())
                return _json([self._info(h.name, v) for v in h.vms.values()])
        if parts[1:] == ["net", "probe"]:
            return self._probe(body)
        if parts[1:] == ["migrations", "incoming"]:
            return self._incoming(h, body)
        if parts[1:] == ["migrations", "incoming", "check"]:
            return httpx.Response(204)
        if len(parts) >= 3 and parts[1] == "vms":
            return self._vm_route(h, parts[2], method, "/".join(parts[3:]), params, body)
        with self.lock:
            self.unhandled[key] += 1
        return _error(404, "not_found", f"no route {method} {req.url.path}")

    def _vm_route(
        self,
        h: SimHost,
        name: str,
        method: str,
        rest: str,
        params: httpx.QueryParams,
        body: dict[str, Any],
    ) -> httpx.Response:
        mid = params.get("migration")
        with self.lock:
            vm = h.vms.get(name)
        if vm is None:
            return _error(404, "vm_not_found", f"no VM named {name!r} on this host", vm=name)
        if rest == "dirty-rate":
            seconds = [float(s) for s in body.get("seconds", [1.0])]
            time.sleep(sum(seconds))  # QMP calc-dirty-rate takes what it measures
            samples = [{"seconds": s, "dirtied_bytes": int(64 * 1024 * s)} for s in seconds]
            rep = {"samples": samples, "memory_bytes": vm.memory_mib * MIB}
            return _json(rep | {"resident_bytes": vm.memory_mib * MIB // 2})
        if rest == "migration" and method == "GET":
            return self._progress(h, vm, mid, int(params.get("wait_ms", "0")), params)
        if rest == "migration/finish":
            return self._finish(h, vm, mid, int(params.get("wait_ms", "0")))
        with self.lock:
            if h.vms.get(name) is not vm:  # released or deleted since it was looked up
                return _error(404, "vm_not_found", f"no VM named {name!r} on this host", vm=name)
            self._settle_vm(vm, time.monotonic())
            return self._vm_step(h, vm, method, rest, mid, body)

    def _vm_step(
        self,
        h: SimHost,
        vm: SimVm,
        method: str,
        rest: str,
        mid: str | None,
        body: dict[str, Any],
    ) -> httpx.Response:
        """The routes that answer at once (the lock is held)."""
        name = vm.name
        if rest == "" and method == "GET":
            return _json(self._info(h.name, vm))
        if rest == "migration" and method == "POST":
            return self._migrate(h, vm, body)
        if rest == "migration" and method == "PATCH":
            m = self.migrations.get(vm.outgoing or "")
            if m is None or m.status in FINAL:
                return _error(409, "conflict", f"VM {name} has no outgoing migration to tune")
            return _json(self._stats(m, time.monotonic()))
        if rest == "migration/keep-disks":
            if mid is not None and vm.incoming not in (None, mid):
                return _error(409, "conflict", f"VM {name} arrived by {vm.incoming}, not {mid}")
            if vm.incoming is not None:
                vm.arrived, vm.incoming = vm.incoming, None
            return httpx.Response(204)
        if rest == "announce":
            return httpx.Response(204)
        if rest == "release":
            m = self.migrations.get(vm.outgoing or "")
            ok = vm.runstate == "postmigrate" and m is not None and m.status == "completed"
            if not ok or (mid is not None and vm.outgoing != mid):
                return _error(409, "conflict", f"VM {name} is {vm.runstate} here, not migrated")
            del h.vms[name]
            return httpx.Response(204)
        if rest == "migration/cancel":
            m = self.migrations.get(mid or vm.outgoing or "")
            if m is None:
                return _json({"status": "none"})
            if m.status in ("setup", "active"):
                self._end(m, "cancelled")
            return _json(self._stats(m, time.monotonic()))
        if rest == "resume":
            m = self.migrations.get(vm.outgoing or "")
            if vm.runstate == "postmigrate" and m is not None and m.status == "completed":
                return _error(409, "migrated_away", f"VM {name} completed its migration away")
            if vm.runstate in ("paused", "running"):
                vm.runstate = "running"
            return _json({"qemu_status": vm.runstate})
        if rest == "" and method == "DELETE":
            if mid is not None and (vm.incoming != mid or vm.ran):
                return _error(409, "conflict", f"VM {name} here is not that destination")
            m = self.migrations.get(vm.incoming or "")
            if m is not None and m.status in ("setup", "active"):
                self._end(m, "failed")  # the stream's other end went away
            del h.vms[name]
            return httpx.Response(204)
        self.unhandled[f"{method} /v1/vms/{{vm}}/{rest}"] += 1
        return _error(404, "not_found", f"no route {method} /v1/vms/{name}/{rest}")

    # ------------------------------------------------------------------ migrations

    def _incoming(self, h: SimHost, body: dict[str, Any]) -> httpx.Response:
        spec: dict[str, Any] = body["spec"]
        name, mid = str(spec["name"]), str(body.get("migration_id") or f"anon-{spec['name']}")
        start = str(body.get("params", {}).get("destination_start", "paused"))
        source = str(body.get("source_host") or "")
        memory = int(spec["memory"])
        with self.lock:
            if name in h.vms:
                return _error(409, "conflict", f"a VM named {name!r} is defined", vm=name)
            h.vms[name] = SimVm(name, spec, memory, 0.0, "inmigrate", incoming=mid)
            lo, hi = self.durations
            share = (zlib.crc32(name.encode()) % 1000) / 1000
            self.migrations[mid] = SimMigration(
                mid, name, source, h.name, memory * MIB, lo + (hi - lo) * share, start
            )
            for end in (source, h.name):
                if end in self.in_flight:
                    self.in_flight[end].add(mid)
                    n = len(self.in_flight[end])
                    self.max_in_flight[end] = max(self.max_in_flight.get(end, 0), n)
        port = 49152 + len(h.vms)
        return _json({"uri": f"tcp:198.18.0.1:{port}", "port": port, "addresses": ["198.18.0.1"]})

    def _migrate(self, h: SimHost, vm: SimVm, body: dict[str, Any]) -> httpx.Response:
        mid = str(body.get("migration_id") or f"anon-{vm.name}")
        m = self.migrations.get(mid)
        if m is None or m.destination == h.name:
            return _error(409, "conflict", f"no destination prepared for {vm.name}", vm=vm.name)
        if vm.runstate != "running":
            return _error(409, "conflict", f"VM {vm.name} cannot migrate while {vm.runstate}")
        m.source, m.status, m.issued = h.name, "active", time.monotonic()
        vm.outgoing = mid
        return _json(self._stats(m, m.issued))

    def _progress(
        self, h: SimHost, vm: SimVm, mid: str | None, wait_ms: int, params: httpx.QueryParams
    ) -> httpx.Response:
        """The long-poll: with ``wait_ms``, wait for a status other than ``known_status``."""
        with self.lock:
            current = vm.outgoing or vm.incoming or vm.arrived
            if mid is not None and current != mid:
                return _json({"status": "none"})
            m = self.migrations.get(current or "")
            if m is None:
                return _json({"status": "none"})
            now = time.monotonic()
            self._settle(m, now)
            known = params.get("known_status")
            wait = 0.0
            if wait_ms > 0 and m.status == known and known not in FINAL and m.source == h.name:
                wait = min(wait_ms / 1000, max(m.issued + m.duration_s - now, 0.0))
        if wait > 0:
            time.sleep(wait)
        with self.lock:
            now = time.monotonic()
            self._settle(m, now)
            return _json(self._stats(m, now))

    def _finish(self, h: SimHost, vm: SimVm, mid: str | None, wait_ms: int) -> httpx.Response:
        """The word to a paused destination: it runs once the stream is loaded."""
        with self.lock:
            m = self.migrations.get(mid or "")
            if m is None or vm.incoming != mid:
                return _error(409, "conflict", f"VM {vm.name} is not that destination")
            wait = 0.0
            if m.status == "active":
                wait = min(wait_ms / 1000, max(m.issued + m.duration_s - time.monotonic(), 0))
        if wait > 0:
            time.sleep(wait)
        with self.lock:
            self._settle(m, time.monotonic())
            if m.status in ("failed", "cancelled") or vm.runstate == "gone":
                return _error(409, "conflict", f"the incoming migration of {vm.name} failed")
            if m.status == "completed":
                vm.runstate, vm.ran = "running", True
            return _json(self._info(h.name, vm))

    def _info(self, host: str, vm: SimVm) -> dict[str, Any]:
        m = self.migrations.get(vm.outgoing or "")
        return _info(host, vm, None if vm.outgoing is None else m.status if m else "none")

    def _settle_all(self, now: float) -> None:
        for m in self.migrations.values():
            if m.status == "active":
                self._settle(m, now)

    def _settle_vm(self, vm: SimVm, now: float) -> None:
        for mid in (vm.outgoing, vm.incoming):
            m = self.migrations.get(mid or "")
            if m is not None:
                self._settle(m, now)

    def _settle(self, m: SimMigration, now: float) -> None:
        """QEMU completes once the active time has passed; the source agent's watcher then
        gives the paused destination the word (the manager gives it again)."""
        if m.status != "active" or now < m.issued + m.duration_s:
            return
        self._end(m, "completed")
        src = self.hosts[m.source].vms.get(m.vm)
        if src is not None and src.outgoing == m.id:
            src.runstate = "postmigrate"
        dst = self.hosts[m.destination].vms.get(m.vm)
        if dst is not None and dst.incoming == m.id:
            dst.runstate, dst.ran = "running", True

    def _end(self, m: SimMigration, status: str) -> None:
        m.status = status
        for end in (m.source, m.destination):
            self.in_flight.get(end, set()).discard(m.id)
        if status != "completed":
            dst = self.hosts[m.destination].vms.get(m.vm)
            if dst is not None and dst.incoming == m.id and not dst.ran:
                dst.runstate = "gone"  # the destination's QEMU exits with its stream

    def _stats(self, m: SimMigration, now: float) -> dict[str, Any]:
        active = m.status == "active"
        done = m.status == "completed"
        frac = 1.0 if done else min(max((now - m.issued) / m.duration_s, 0.0), 0.99)
        sent = int(m.total * frac) if m.status != "setup" else 0
        return {
            "status": m.status,
            "migration_id": m.id,
            "transferred": sent,
            "remaining": m.total - sent,
            "total": m.total,
            "mbps": round(m.total * 8 / m.duration_s / 1e6, 3) if active or done else 0.0,
            "passes": 1 if active or done else 0,
            "setup_time_ms": 2,
            "total_time_ms": round(m.duration_s * 1000) if done else None,
            "downtime_ms": 20 if done else None,
            "finish_ms": 1.0 if done else None,
        }

    # ------------------------------------------------------------------ facts and usage

    def _metrics(self, h: SimHost) -> dict[str, Any]:
        """A usage sample: each VM with a QEMU near its typical load (a few % either way,
        so DRS's demand window sees samples that differ)."""
        with self.lock:
            self._tick += 1
            tick = self._tick
            live = [v for v in h.vms.values() if v.runstate != "gone"]
            cpu = [
                round(v.cpu_percent * (0.9 + 0.02 * ((tick * 7 + i * 13) % 11)), 2)
                if v.runstate == "running"
                else 0.0
                for i, v in enumerate(live)
            ]
        vms = [
            {"name": v.name, "cpu_percent": c, "rss_bytes": v.memory_mib * MIB}
            | {"memory_mib": v.memory_mib}
            for v, c in zip(live, cpu, strict=True)
        ]
        used = sum(v.memory_mib for v in live)
        return {
            "sampled_at": datetime.now(UTC).isoformat(),
            "cpus": h.cpus,
            "cpu_percent": round(sum(cpu) / h.cpus, 2),
            "memory_total_bytes": h.memory_bytes,
            "memory_available_bytes": max(h.memory_bytes - used * MIB, 0),
            "vms_memory_mib": used,
            "vms": vms,
        }

    def _probe(self, body: dict[str, Any]) -> httpx.Response:
        upload = bool(body.get("upload", True))
        seconds = float(body.get("seconds", 0.5)) if upload else 0.0
        time.sleep(seconds if upload else 4 * RTT_MS / 1000)
        return _json(
            {
                "rtt_ms": RTT_MS,
                "bandwidth_bps": LINK_BPS if upload else 0.0,
                "bytes": int(LINK_BPS * seconds),
                "seconds": seconds,
                "address": None,
                "unreachable": [],
                "local_ifname": "eth1",
                "local_mtu": 1500,
            }
        )


QEMU_STATE = {"running": "running", "inmigrate": "paused", "postmigrate": "paused"}


def _info(host: str, vm: SimVm, outgoing: str | None = None) -> dict[str, Any]:
    """VmInfo; ``outgoing``: the status of its recorded outgoing migration."""
    return {
        "name": vm.name,
        "uuid": vm.spec["uuid"],
        "host": host,
        "state": QEMU_STATE.get(vm.runstate, "paused" if vm.runstate == "paused" else "stopped"),
        "qemu_status": vm.runstate,
        "spec": vm.spec,
        "incoming_migration": vm.incoming,
        "outgoing_migration": vm.outgoing,
        "outgoing_status": outgoing,
    }


def _raw(body: bytes, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=body, headers={"content-type": "application/json"})


def _json(body: Any, status: int = 200) -> httpx.Response:
    return _raw(json.dumps(body).encode(), status)


def _error(status: int, code: str, message: str, vm: str | None = None) -> httpx.Response:
    return _json({"error": {"code": code, "message": message, "vm": vm}}, status)
