"""Scripted host agents served in-process (httpx MockTransport) for the manager's real port.

The world keeps, per host, each VM's QEMU run state and migration status, and answers the
agent API as the real agent does (qmotion.agent.migration.outgoing): ``resume`` refuses a VM that
migrated away (409 ``migrated_away``) or is still migrating, ``release`` refuses unless QEMU
is ``postmigrate``, a cancelled migration ends the destination's incoming QEMU. Like QEMU, a
migration completes only from ``active``: once ``cancelling`` it ends ``cancelled``.

Tests inject the races that matter through ``before_request``: complete the migration, or
make a host unreachable, just before the k-th request, for every k; ``fail_next`` makes a
route answer an error status instead, once per queued status.

Convergence. A VM given a scripted ``Guest`` (``World.guests``) migrates as QEMU 10's pre-copy
does, paced by a simulated clock (``World.clock``, which a test hands to the port in place of
``time``) over a scripted ``Link``; other VMs complete after ``polls_to_complete`` progress
queries, as before. The agent's side is the real one: what the scripted agents tell their
QEMU is ``qmotion.agent.migration.outgoing``'s own ``_capabilities``, ``_parameters`` and
``_tune_parameters``, and the scripted QEMU refuses what QEMU refuses (migrate_params_check,
migrate_caps_check). QEMU's part, from migration/ram.c, migration.c and cpu-throttle.c:

- the first pass sends the guest's resident memory; each later pass sends what the dirty log
  held at the last bitmap sync (``remaining``), while the guest dirties more;
- a sync (``dirty-sync-count``) happens when what is left drops under the switchover
  threshold (the measured rate times ``downtime-limit``); if what the sync finds is still
  under it, QEMU switches over. Also, with auto-converge, at least every 5 s (QEMU >= 9.2);
- auto-converge throttles only at syncs at least 1 s apart: when the period dirtied more than
  ``throttle-trigger-threshold`` % of what it sent, twice, the throttle starts at
  ``cpu-throttle-initial`` or, once running, rises by ``cpu-throttle-increment`` (up to 99).
  Changing ``cpu-throttle-initial`` later does not move a running throttle. The throttle slows
  the vCPUs: the guest's sweep and hot set, not what device emulation (``dma_bytes``) writes;
- the throttle stops when the migration ends (completed, failed or cancelled);
- ``mbps`` and ``expected-downtime`` are measured over 100 ms windows, ``dirty-pages-rate``
  over the (>= 1 s) throttle period; the switchover threshold uses the measured rate;
- a destination QEMU that goes away fails the source's migration (the source runs on);
- xbzrle is accepted and recorded; its compression is not modelled (a hot set costs full
  pages: the pessimistic bound).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from qmotion.agent.migration.outgoing import _capabilities, _parameters, _tune_parameters
from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.api.host import AccelInfo, HostMetrics, VmMetrics
from qmotion.api.migration import (
    DirtyRateReport,
    DirtyRateRequest,
    DirtyRateSample,
    IncomingRequest,
    MigrationParams,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PathProbeRequest,
)
from qmotion.api.server import TaskOut
from qmotion.api.storage import (
    DiskMirror,
    DiskUsage,
    MirrorStatus,
    NbdExport,
    NbdMirrorRequest,
    NbdTargets,
)
from qmotion.api.vm import Disk, GuestConfig, Nic, VmInfo, VmSpec, VmState
from qmotion.server.agents import AgentConnector
from qmotion.server.db import Database, Host, Vm, utcnow
from qmotion.server.tasks.runner import TaskRunner

MIB = 1 << 20
GUEST_BYTES = 256 * MIB
PAGE = 4096
FINISHED = ("completed", "failed", "cancelled")
STEP_S = 0.01  # the simulation's step
REQUEST_S = 0.002  # what one agent request costs, in simulated time
HOT_ROUND_S = 0.01  # a hot set is rewritten within this much running time
BUFFER_DELAY_S = 0.1  # QEMU measures its transfer rate over windows this long
THROTTLE_PERIOD_S = 1.0  # migration_bitmap_sync: rates and auto-converge, at most once a second
BG_SYNC_S = 5.0  # cpu-throttle.c: with auto-converge, a sync at least this often
MAX_MIGRATE_DOWNTIME_MS = 2000 * 1000
# QEMU 10's defaults (migration/options.c), before the agent sets anything.
QEMU_PARAMETERS: dict[str, int] = {
    "downtime-limit": 300,
    "max-bandwidth": 128 * MIB,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "throttle-trigger-threshold": 50,
    "max-cpu-throttle": 99,
    "xbzrle-cache-size": 64 * MIB,
    "multifd-channels": 2,
    "max-postcopy-bandwidth": 0,
}
QEMU_CAPABILITIES = (
    "events",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "xbzrle",
    "postcopy-ram",
)


class QmpError(Exception):
    """A QMP command QEMU refused (GenericError)."""


def check_parameters(params: dict[str, Any]) -> None:
    """QEMU's migrate_params_check, for the parameters qmotion sets; raises QmpError."""
    unknown = set(params) - set(QEMU_PARAMETERS)
    if unknown:
        raise QmpError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
    for name, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise QmpError(f"Parameter '{name}' expects uint64")
    p = QEMU_PARAMETERS | params
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise QmpError("Option throttle_trigger_threshold expects an integer 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise QmpError("Option cpu_throttle_initial expects an integer 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise QmpError("Option cpu_throttle_increment expects an integer 1 to 99")
    if p["downtime-limit"] > MAX_MIGRATE_DOWNTIME_MS:
        raise QmpError("Option downtime_limit expects an integer 0 to 2000000 ms")
    if not 1 <= p["multifd-channels"] <= 255:
        raise QmpError("Option multifd_channels expects a value between 1 and 255")
    size = p["xbzrle-cache-size"]
    if size < PAGE or size & (size - 1):
        raise QmpError(
            "Option xbzrle_cache_size expects a power of two no less than the target page size"
        )
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise QmpError("max_cpu_throttle expects an integer cpu_throttle_initial to 99")


def check_capabilities(caps: list[dict[str, Any]]) -> dict[str, bool]:
    """QEMU's migrate_caps_check, for the capabilities qmotion sets; raises QmpError."""
    out: dict[str, bool] = {}
    for c in caps:
        if c.get("capability") not in QEMU_CAPABILITIES:
            raise QmpError(f"Invalid parameter '{c.get('capability')}'")
        out[str(c["capability"])] = bool(c["state"])
    if out.get("multifd") and out.get("xbzrle"):
        raise QmpError("Multifd is not compatible with xbzrle")
    if out.get("multifd") and out.get("postcopy-ram"):
        raise QmpError("Postcopy is not yet compatible with multifd")  # QEMU 10.0.2, measured
    return out


@dataclass
class Guest:
    """What a scripted guest writes: ``sweep_bps`` of new pages per second of vCPU time, over
    its resident memory; ``hot_bytes`` its vCPUs rewrite constantly; ``dma_bytes`` device
    emulation rewrites constantly (not slowed by throttling the vCPUs)."""

    sweep_bps: float = 0.0
    hot_bytes: int = 0
    dma_bytes: int = 0
    resident_bytes: int | None = None  # None: all of its memory


@dataclass
class Link:
    """The migration path between any two hosts."""

    bandwidth_bps: float = 1.25e9
    rtt_ms: float = 0.2
    probe_bps: float | None = None  # what the agents' HTTP probe measures; None: bandwidth


class SimClock:
    """The simulated time: agent requests and QEMU's progress advance it, nothing else. Hand
    it to the port as its ``time`` module."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def monotonic(self) -> float:
        return self.t


@dataclass
class FakeQemu:
    """One QEMU's migration settings and vCPU throttle."""

    caps: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(QEMU_CAPABILITIES, False))
    params: dict[str, int] = field(default_factory=lambda: dict(QEMU_PARAMETERS))
    throttle_pct: int = 0  # 0: not throttling

    def set_capabilities(self, caps: list[dict[str, Any]], migrating: bool) -> None:
        if migrating:
            raise QmpError("There's a migration process in progress")
        self.caps |= check_capabilities(caps)

    def set_parameters(self, params: dict[str, Any]) -> None:
        check_parameters(params)
        self.params |= params


@dataclass
class Precopy:
    """QEMU's outgoing RAM migration on the source (migration/ram.c's RAMState, roughly)."""

    started: float
    memory: int
    resident: int
    bitmap: float  # dirty and not yet sent: QEMU's "remaining"
    # Of which in the guest's hot set and in what device emulation rewrites: pages found
    # dirty again while still marked are not new.
    bitmap_hot: float = 0.0
    bitmap_dma: float = 0.0
    transferred: float = 0.0
    syncs: int = 1  # dirty-sync-count: the first sync is at setup
    swept: float = 0.0  # written by the sweep since the last sync
    cpu_s: float = 0.0  # vCPU running time since the last sync
    wall_s: float = 0.0  # time since the last sync
    period_start: float = 0.0
    period_dirty: float = 0.0  # num_dirty_pages_period, in bytes
    xfer_prev: float = 0.0
    high: int = 0  # dirty_rate_high_cnt
    dirty_pages_rate: int = 0
    dirty_bytes_last_sync: float = 0.0
    expected_downtime_ms: int = 0
    mbps: float = 0.0
    window_start: float = 0.0
    window_bytes: float = 0.0
    next_tick: float = 0.0  # the background sync timer
    tick_syncs: int = 1
    total_time_ms: int | None = None
    downtime_ms: int | None = None


@dataclass
class FakeVm:
    spec: VmSpec
    runstate: str  # QEMU's: running, inmigrate, postmigrate, paused; gone: QEMU exited
    migration: str = "none"  # QEMU's migration status on this side
    transferred: int = 0
    polls: int = 0
    started: float = 0.0
    qemu: FakeQemu = field(default_factory=FakeQemu)
    precopy: Precopy | None = None  # an outgoing migration of a scripted guest
    # Shared-nothing. Source: the disk mirror's phase (None, mirroring, ready, completed) and
    # polls; destination: the disks its incoming migration created (removed with it, until
    # the manager says they are the VM's).
    mirror: str | None = None
    mirror_polls: int = 0
    owned: list[str] = field(default_factory=list)
    held: bool = False  # a cold migration's hold: not started until released


@dataclass
class World:
    """Two or more hosts' agents and their QEMUs, behind one lock (handlers run in threads)."""

    hosts: tuple[str, ...] = ("h1", "h2")
    polls_to_complete: int = 3  # progress queries before QEMU completes on its own
    duration_s: float = 0.0  # and at least this long after migrate was issued
    vms: dict[str, dict[str, FakeVm]] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    # Migration addresses that do not answer (as a network that is down): probes skip them.
    dead_addresses: set[str] = field(default_factory=set)
    uris: list[tuple[str, str]] = field(default_factory=list)  # (source host, stream URI)
    before_request: Callable[[World, int, str, str], None] | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    max_active_per_host: dict[str, int] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Convergence: scripted guests (by VM name), the path, and simulated time.
    guests: dict[str, Guest] = field(default_factory=dict)
    link: Link = field(default_factory=Link)
    clock: SimClock = field(default_factory=SimClock)
    # (method, path) -> statuses to answer instead, one per request, in order.
    fail_next: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # What the agents received (host, kind, params) and told their QEMU (host, vm, command, args).
    params_received: list[tuple[str, str, MigrationParams]] = field(default_factory=list)
    qmp: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    # Disk files per host ("datastore:path"), for shared-nothing migrations.
    files: dict[str, set[str]] = field(default_factory=dict)
    # Host facts beyond the defaults (cpus, memory_bytes, ...), and each VM's CPU load (% of
    # one CPU) as the agents' metrics report it.
    facts_override: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    dirty_rate: dict[str, float] = field(default_factory=dict)  # MiB/s, once measured

    def __post_init__(self) -> None:
        for h in self.hosts:
            self.vms.setdefault(h, {})
            self.files.setdefault(h, set())

    def disks_present(self, host: str, vm: str) -> bool:
        """Every disk the VM's definition on ``host`` names exists there."""
        v = self.vms[host][vm]
        return all(f"{d.datastore}:{d.path}" in self.files[host] for d in v.spec.disks)

    # ---------------------------------------------------------------- what tests look at

    def running_copies(self, vm: str) -> list[str]:
        return [h for h in self.hosts if self._state(h, vm) == "running"]

    def _state(self, host: str, vm: str) -> str | None:
        v = self.vms[host].get(vm)
        return v.runstate if v else None

    def tunes(self, host: str, vm: str) -> list[dict[str, Any]]:
        """The migrate-set-parameters QEMU accepted on ``host`` once ``vm``'s migration ran."""
        out, migrating = [], False
        for h, name, cmd, args in self.qmp:
            if h == host and name == vm:
                migrating = migrating or cmd == "migrate"
                if migrating and cmd == "migrate-set-parameters":
                    out.append(args)
        return out

    def complete(self, vm: str) -> bool:
        """QEMU's switchover: possible only while the source's migration is active."""
        with self.lock:
            src = next(
                (h for h in self.hosts if (v := self.vms[h].get(vm)) and v.migration == "active"),
                None,
            )
            dst = next(
                (h for h in self.hosts if (v := self.vms[h].get(vm)) and v.runstate == "inmigrate"),
                None,
            )
            if src is None or dst is None:
                return False
            s, d = self.vms[src][vm], self.vms[dst][vm]
            if s.mirror is not None:
                if s.mirror != "ready":
                    # The source agent cancels at pre-switchover: not in sync.
                    s.migration, d.runstate = "cancelled", "gone"
                    return False
                s.mirror = "completed"  # ended in sync before the device state left
            if s.precopy is not None:
                self._switchover(s, s.precopy)
                return True
            s.migration, s.runstate, s.transferred = "completed", "postmigrate", GUEST_BYTES
            d.runstate, d.migration = "running", "completed"
            return True

    def _observe(self) -> None:
        """Migrations each host takes part in now, as its agent would report them."""
        for h in self.hosts:
            n = sum(
                1
                for v in self.vms[h].values()
                if v.migration in ("active", "cancelling") or v.runstate == "inmigrate"
            )
            self.max_active_per_host[h] = max(self.max_active_per_host.get(h, 0), n)

    # ---------------------------------------------------------------- the seam

    def connector(self) -> AgentConnector:
        return AgentConnector(transport=lambda url: httpx.MockTransport(self._handler(url)))

    def _handler(self, url: str) -> Callable[[httpx.Request], httpx.Response]:
        host = _host_of(url)

        def handle(request: httpx.Request) -> httpx.Response:
            with self.lock:
                k = len(self.requests)
                self.requests.append((host, request.method, request.url.path))
                self._tick(REQUEST_S)
                if self.before_request is not None:
                    self.before_request(self, k, host, request.url.path)
                if host in self.unreachable:
                    raise httpx.ConnectError("connection refused", request=request)
                failures = self.fail_next.get((request.method, request.url.path))
                if failures:
                    status = failures.pop(0)
                    return _error(status, "scripted_failure", f"scripted {status}")
                try:
                    return self._answer(host, request)
                except ValidationError as exc:
                    return _error(422, "invalid_request", str(exc))
                except QmpError:
                    # A QMP error the agent does not catch: FastAPI's plain 500.
                    return httpx.Response(500, text="Internal Server Error")
                finally:
                    self._observe()

        return handle

    def _answer(self, host: str, req: httpx.Request) -> httpx.Response:
        path, method = req.url.path, req.method
        here = self.vms[host]
        if path == "/v1/migrations/incoming" and method == "POST":
            return self._incoming(host, IncomingRequest.model_validate(json.loads(req.content)))
        if path == "/v1/migrations/incoming/check" and method == "POST":
            incoming = IncomingRequest.model_validate(json.loads(req.content))
            if incoming.spec.name in here:
                return _error(409, "conflict", f"a VM named {incoming.spec.name!r} is defined")
            return httpx.Response(204)
        if path == "/v1/host" and method == "GET":
            return _json(self.host_facts(host))
        if path == "/v1/metrics" and method == "GET":
            return _json(self._metrics(host))
        if path == "/v1/vms" and method == "GET":
            return _json([self._info(host, v).model_dump(mode="json") for v in here.values()])
        if path == "/v1/vms" and method == "POST":
            spec = VmSpec.model_validate(json.loads(req.content))
            if spec.name in here:
                return _error(409, "conflict", f"a VM named {spec.name!r} is defined")
            here[spec.name] = FakeVm(spec=spec, runstate="gone")
            return _json(self._info(host, here[spec.name]).model_dump(mode="json"), 201)
        if path == "/v1/net/probe" and method == "POST":
            return self._probe(PathProbeRequest.model_validate(json.loads(req.content)))
        m = re.fullmatch(r"/v1/vms/([a-z0-9-]+)(/.*)?", path)
        if m is None:
            return _error(404, "not_found", f"no route {path}")
        name, rest = m.group(1), m.group(2) or ""
        vm = here.get(name)
        # Like the agent, these ask for the VM's monitor (409 without a QEMU) or its outgoing
        # migration (409 without one) before anything else.
        if method == "POST" and rest == "/dirty-rate":
            return self._dirty_rate(
                name, vm, DirtyRateRequest.model_validate(json.loads(req.content))
            )
        if method == "PATCH" and rest == "/migration":
            return self._tune(host, name, vm, MigrationTune.model_validate(json.loads(req.content)))
        if vm is None:
            return _error(404, "vm_not_found", f"no VM named {name!r} on this host", vm=name)
        if method == "GET" and rest == "":
            return _json(self._info(host, vm).model_dump(mode="json"))
        if method == "DELETE" and rest == "":
            del here[name]
            self.files[host] -= set(vm.owned)  # an unfinished copy's disks go with it
            return httpx.Response(204)
        if rest == "/export":
            # qmotion.agent.disks.transfer: hold a stopped VM; serving disks is not modelled here.
            if method == "DELETE":
                # release=false ends the exports only; the hold stays (transfer.unexport).
                if req.url.params.get("release", "true") == "true":
                    vm.held = False
                return httpx.Response(204)
            if vm.runstate != "gone":
                return _error(409, "conflict", f"VM {name} is running", vm=name)
            if vm.spec.disks and req.url.params.get("copy", "true") == "true":
                return _error(501, "not_modelled", "the world serves no disk exports", vm=name)
            vm.held = True
            return _json([])
        if rest.startswith("/migration/mirror") or rest in ("/disks", "/migration/keep-disks"):
            return self._disk_route(host, name, vm, method, rest, req)
        if method == "POST" and rest == "/migration":
            out = OutgoingRequest.model_validate(json.loads(req.content))
            return self._outgoing(host, name, vm, out)
        if method == "GET" and rest == "/migration":
            if vm.precopy is not None:
                self._wait(vm, req)
            if vm.migration == "active" and vm.precopy is None:
                vm.polls += 1
                vm.transferred = min(GUEST_BYTES, vm.transferred + GUEST_BYTES // 4)
                long_enough = time.monotonic() - vm.started >= self.duration_s
                if vm.polls >= self.polls_to_complete and long_enough:
                    self.complete(name)
            elif vm.migration == "cancelling":
                self._settle_cancel(name, vm)
            return _json(self._stats(vm))
        if method == "POST" and rest == "/migration/cancel":
            if vm.migration == "active":
                vm.migration = "cancelling"
            return _json(self._stats(vm))
        if method == "POST" and rest == "/resume":
            after_failed = req.url.params.get("after_failed_switchover") == "true"
            if vm.migration == "completed" and not after_failed:
                return _error(409, "migrated_away", f"VM {name} completed its migration away")
            if vm.migration not in ("none", "completed", "failed", "cancelled"):
                return _error(409, "conflict", f"VM {name} is still migrating ({vm.migration})")
            if vm.runstate in ("paused", "postmigrate"):
                vm.runstate = "running"
            vm.mirror = None  # it runs on its own disks: any copy is void
            return _json({"qemu_status": vm.runstate})
        if method == "POST" and rest == "/release":
            if vm.runstate != "postmigrate":
                return _error(409, "conflict", f"VM {name} is {vm.runstate} here, not migrated")
            if vm.mirror == "completed":
                # The copies run elsewhere now: the old files go.
                self.files[host] -= {f"{d.datastore}:{d.path}" for d in vm.spec.disks}
            del here[name]
            return httpx.Response(204)
        if method == "POST" and rest == "/announce":
            return httpx.Response(204)
        return _error(404, "not_found", f"no route {method} {path}")

    def _disk_route(
        self, host: str, name: str, vm: FakeVm, method: str, rest: str, req: httpx.Request
    ) -> httpx.Response:
        """qmotion.agent.disks.nbd as the agent serves it: the source's mirror, the destination's
        disks. A mirror is in sync (write-blocking, actively synced) at its second poll; one
        whose destination is gone fails."""
        if method == "GET" and rest == "/disks":
            usage = [
                DiskUsage(
                    index=i,
                    datastore=d.datastore,
                    path=d.path,
                    format=d.format,
                    virtual_size=64 << 20,
                    allocated_bytes=8 << 20,
                )
                for i, d in enumerate(vm.spec.disks)
            ]
            return _json([u.model_dump(mode="json") for u in usage])
        if method == "POST" and rest == "/migration/keep-disks":
            vm.owned = []
            return httpx.Response(204)
        if method == "POST" and rest == "/migration/mirror":
            NbdMirrorRequest.model_validate(json.loads(req.content))
            if vm.mirror in ("mirroring", "ready"):
                return _json(self._mirror_status(name, vm))
            if vm.runstate not in ("running", "paused"):
                return _error(409, "conflict", f"VM {name} is not running")
            vm.mirror, vm.mirror_polls = "mirroring", 0
            return _json(self._mirror_status(name, vm))
        if method == "GET" and rest == "/migration/mirror":
            if vm.mirror is None:
                return _error(409, "conflict", f"VM {name} has no disk mirror")
            vm.mirror_polls += 1
            destination_gone = not any(
                (d := self.vms[h].get(name)) is not None and d.runstate == "inmigrate"
                for h in self.hosts
                if h != host
            )
            if vm.mirror in ("mirroring", "ready") and destination_gone:
                vm.mirror = "failed"
            elif vm.mirror == "mirroring" and vm.mirror_polls >= 2:
                vm.mirror = "ready"
            return _json(self._mirror_status(name, vm))
        if method == "POST" and rest == "/migration/mirror/abort":
            vm.mirror = None
            return _json(MirrorStatus(vm=name, phase="aborted", datastore="").model_dump())
        return _error(404, "not_found", f"no route {method} {rest}")

    @staticmethod
    def _mirror_status(name: str, vm: FakeVm) -> dict[str, Any]:
        ready = vm.mirror in ("ready", "completed")
        phase = vm.mirror if vm.mirror in ("mirroring", "ready", "failed") else "completed"
        st = MirrorStatus(
            vm=name,
            phase=phase,
            datastore="local-h2",
            copy_mode="write-blocking" if ready else "background",
            disks=[
                DiskMirror(
                    index=i,
                    job=f"qm-nbd-{i}",
                    source=d,
                    target=d,
                    status="ready" if ready else "running",
                    offset=64 << 20 if ready else 16 << 20,
                    length=64 << 20,
                    ready=ready,
                    actively_synced=ready,
                )
                for i, d in enumerate(vm.spec.disks)
            ],
            total_bytes=(64 << 20) * len(vm.spec.disks),
            remaining_bytes=0 if ready else (48 << 20) * len(vm.spec.disks),
            rate_bps=1e6,
            error="the destination went away" if vm.mirror == "failed" else None,
        )
        return st.model_dump(mode="json")

    def _qmp(self, host: str, vm: str, command: str, args: dict[str, Any]) -> None:
        self.qmp.append((host, vm, command, args))

    def _incoming(self, host: str, req: IncomingRequest) -> httpx.Response:
        """Migrations.incoming: QEMU started with -incoming defer, then configured."""
        spec = req.spec
        self.params_received.append((host, "incoming", req.params))
        nbd = None
        if req.copy_disks is not None:
            disks = list(spec.disks)
            for c in req.copy_disks.disks:
                disks[c.index] = Disk(
                    datastore=req.copy_disks.datastore, path=f"{spec.name}/disk{c.index}.qcow2"
                )
            spec = spec.model_copy(update={"disks": disks})
        vm = FakeVm(spec=spec, runstate="inmigrate")
        if req.copy_disks is not None:
            vm.owned = [
                f"{spec.disks[c.index].datastore}:{spec.disks[c.index].path}"
                for c in req.copy_disks.disks
            ]
            self.files[host] |= set(vm.owned)
            nbd = NbdTargets(
                host="198.18.0.2",
                port=10809,
                exports=[
                    NbdExport(index=c.index, name=f"disk{c.index}") for c in req.copy_disks.disks
                ],
                disks=spec.disks,
            )
        self.vms[host][spec.name] = vm
        try:
            caps = _capabilities(req.params, source=False)
            vm.qemu.set_capabilities(caps, migrating=False)
            self._qmp(host, spec.name, "migrate-set-capabilities", {"capabilities": caps})
            params = _parameters(req.params)
            vm.qemu.set_parameters(params)
            self._qmp(host, spec.name, "migrate-set-parameters", params)
        except QmpError as exc:
            del self.vms[host][spec.name]
            self.files[host] -= set(vm.owned)
            return _error(
                500,
                "operation_failed",
                f"preparing incoming migration of {spec.name} failed: {exc}; "
                "the destination was removed",
                vm=spec.name,
            )
        # Like the agent: QEMU listens on the address the manager chose, else the preferred.
        listen = str(req.address) if req.address is not None else f"198.18.0.{len(host)}"
        return _json(
            {
                "uri": f"tcp:{listen}:4444",
                "port": 4444,
                "addresses": [listen],
                "nbd": nbd.model_dump(mode="json") if nbd else None,
            }
        )

    def _outgoing(self, host: str, name: str, vm: FakeVm, req: OutgoingRequest) -> httpx.Response:
        """Migrations.outgoing: refuse a second migration or a stopped VM, configure, migrate."""
        if vm.migration in ("setup", "active", "cancelling"):
            return _error(409, "conflict", f"VM {name} is already migrating", vm=name)
        if vm.runstate not in ("running", "paused"):
            return _error(409, "conflict", f"VM {name} cannot migrate while {vm.runstate}")
        if req.params.copy_datastore is None:
            vm.mirror = None
        elif vm.mirror != "ready":
            return _error(409, "conflict", f"the disks of {name} are not in sync yet", vm=name)
        self.params_received.append((host, "outgoing", req.params))
        self.uris.append((host, req.uri))
        caps = _capabilities(req.params, source=True)
        vm.qemu.set_capabilities(caps, migrating=False)
        self._qmp(host, name, "migrate-set-capabilities", {"capabilities": caps})
        params = _parameters(req.params)
        vm.qemu.set_parameters(params)
        self._qmp(host, name, "migrate-set-parameters", params)
        self._qmp(host, name, "migrate", {"uri": req.uri})
        vm.migration, vm.polls, vm.started = "active", 0, time.monotonic()
        vm.transferred = 0
        guest = self.guests.get(name)
        if guest is not None:
            memory = vm.spec.memory << 20
            resident = min(guest.resident_bytes or memory, memory)
            now = self.clock.t
            vm.precopy = Precopy(
                started=now,
                memory=memory,
                resident=resident,
                bitmap=float(resident),
                bitmap_hot=float(min(guest.hot_bytes, resident)),
                bitmap_dma=float(min(guest.dma_bytes, resident)),
                expected_downtime_ms=vm.qemu.params["downtime-limit"],
                period_start=now,
                window_start=now,
                next_tick=now + BG_SYNC_S,
            )
        else:
            vm.precopy = None
        return _json(self._stats(vm))

    def _tune(self, host: str, name: str, vm: FakeVm | None, tune: MigrationTune) -> httpx.Response:
        """Migrations.tune: only a migration under way on this (source) host."""
        if vm is None or vm.migration in ("none", *FINISHED):
            return _error(409, "conflict", f"VM {name} has no outgoing migration to tune", vm=name)
        params = _tune_parameters(tune)
        if params:
            vm.qemu.set_parameters(params)
            self._qmp(host, name, "migrate-set-parameters", params)
        return _json(self._stats(vm))

    def _dirty_rate(self, name: str, vm: FakeVm | None, req: DirtyRateRequest) -> httpx.Response:
        """Migrations.dirty_rate: QMP calc-dirty-rate per length; QEMU answers whole MiB/s."""
        if vm is None or vm.runstate == "gone":
            return _error(409, "conflict", f"VM {name} is not running", vm=name)
        guest = self.guests.get(name, Guest())
        memory = vm.spec.memory << 20
        resident = min(guest.resident_bytes or memory, memory)
        samples = []
        for length in req.seconds:
            ms = max(int(length * 1000), 100)
            seconds = ms / 1000
            self._tick(seconds)
            running = vm.runstate == "running"
            written = guest.sweep_bps * seconds + guest.hot_bytes if running else 0.0
            dirtied = min(written + guest.dma_bytes, float(resident))
            rate_mib = int(dirtied / seconds / MIB)
            samples.append(
                DirtyRateSample(seconds=seconds, dirtied_bytes=int(rate_mib * MIB * seconds))
            )
        report = DirtyRateReport(samples=samples, memory_bytes=memory, resident_bytes=resident)
        return _json(report.model_dump(mode="json"))

    def _probe(self, req: PathProbeRequest) -> httpx.Response:
        """netprobe.probe: RTT, then a timed upload to the peer agent."""
        peer = _host_of(req.peer.url)
        if peer not in self.hosts or peer in self.unreachable:
            return _error(
                500, "operation_failed", f"probing the path to {req.peer.url} failed: refused"
            )
        # Like netprobe.probe: the candidates in order, the first that answers is measured;
        # none answering is the agent's 409 peer_unreachable.
        tried: list[str] = []
        address = None
        for c in req.candidates:
            if str(c) in self.dead_addresses:
                tried.append(f"{c}: connect timed out")
                continue
            address = str(c)
            break
        if req.candidates and address is None:
            return _error(409, "peer_unreachable", f"no address of the peer answers: {tried}")
        seconds = req.seconds if req.upload else 0.0
        self._tick(4 * self.link.rtt_ms / 1000 + seconds)
        bps = self.link.probe_bps or self.link.bandwidth_bps
        sent = min(int(bps * seconds), req.max_bytes)
        probe = PathProbe(
            rtt_ms=self.link.rtt_ms,
            bandwidth_bps=sent / seconds if seconds else 0.0,
            bytes=sent,
            seconds=seconds,
            address=address or _host_of(req.peer.url),
            unreachable=tried,
            local_mtu=1500,
            local_ifname="eth1",
        )
        return _json(probe.model_dump(mode="json"))

    def _settle_cancel(self, name: str, vm: FakeVm) -> None:
        vm.migration = "cancelled"
        vm.qemu.throttle_pct = 0
        # The destination's incoming migration fails with the stream: its QEMU exits.
        for h in self.hosts:
            other = self.vms[h].get(name)
            if other is not None and other.runstate == "inmigrate":
                other.runstate = "gone"

    # ---------------------------------------------------------------- QEMU's pre-copy

    def _wait(self, vm: FakeVm, req: httpx.Request) -> None:
        """Migrations.stats: with ``wait_ms``, wait for a status other than ``known_status``."""
        wait_ms = int(req.url.params.get("wait_ms", "0"))
        known = req.url.params.get("known_status")
        if wait_ms <= 0 or vm.migration != known or known in FINISHED:
            return
        deadline = self.clock.t + wait_ms / 1000
        while vm.migration == known and self.clock.t < deadline - 1e-9:
            self._tick(min(STEP_S, deadline - self.clock.t))

    def _tick(self, seconds: float) -> None:
        """Simulated time passes: every scripted migration under way progresses."""
        steps = max(1, math.ceil(seconds / STEP_S - 1e-9))
        dt = seconds / steps
        for _ in range(steps):
            self.clock.t += dt
            for here in self.vms.values():
                for vm in list(here.values()):
                    if vm.precopy is not None and vm.migration == "active":
                        self._step(vm, vm.precopy, dt)

    def _step(self, vm: FakeVm, p: Precopy, dt: float) -> None:
        now = self.clock.t
        if self._destination(vm.spec.name) is None:
            # The stream's other end is gone: QEMU's migration fails, the source runs on.
            vm.migration, vm.qemu.throttle_pct = "failed", 0
            return
        guest = self.guests[vm.spec.name]
        running = dt * (1 - vm.qemu.throttle_pct / 100)
        p.swept += guest.sweep_bps * running
        p.cpu_s += running
        p.wall_s += dt
        rate = min(self.link.bandwidth_bps, float(vm.qemu.params["max-bandwidth"]))
        sent = min(rate * dt, p.bitmap)
        if p.bitmap > 0:
            # Pages go out in address order: each region drains in proportion.
            left = 1 - sent / p.bitmap
            p.bitmap_hot *= left
            p.bitmap_dma *= left
        p.bitmap -= sent
        p.transferred += sent
        p.window_bytes += sent
        if now - p.window_start >= BUFFER_DELAY_S - 1e-9:
            # migration_update_counters
            p.mbps = p.window_bytes * 8 / (now - p.window_start) / 1e6
            per_ms = p.window_bytes / ((now - p.window_start) * 1000)
            if p.dirty_pages_rate and p.transferred > 10000 and per_ms > 0:
                p.expected_downtime_ms = round(p.dirty_bytes_last_sync / per_ms)
            p.window_start, p.window_bytes = now, 0.0
        if vm.qemu.caps["auto-converge"] and now >= p.next_tick:
            # cpu_throttle_dirty_sync_timer_tick: no sync since the last tick, sync now.
            if p.syncs > 1 and p.syncs == p.tick_syncs:
                self._sync(vm, p)
            p.tick_syncs, p.next_tick = p.syncs, p.next_tick + BG_SYNC_S
        # migration_iteration_run: under the threshold, sync; still under it, switch over.
        threshold = p.mbps * 1e6 / 8 * vm.qemu.params["downtime-limit"] / 1000
        if p.bitmap < threshold:
            self._sync(vm, p)
            if p.bitmap < threshold:
                self._switchover(vm, p)

    def _sync(self, vm: FakeVm, p: Precopy) -> None:
        """migration_bitmap_sync: the dirty log into the bitmap; once a second, the rates and
        auto-converge's trigger."""
        guest = self.guests[vm.spec.name]
        hot = max(p.bitmap_hot, guest.hot_bytes * min(1.0, p.cpu_s / HOT_ROUND_S))
        dma = max(p.bitmap_dma, guest.dma_bytes * min(1.0, p.wall_s / HOT_ROUND_S))
        sweep_room = max(p.resident - guest.hot_bytes - guest.dma_bytes, 0)
        swept = min(p.bitmap - p.bitmap_hot - p.bitmap_dma + p.swept, sweep_room)
        new = max(0.0, hot + dma + swept - p.bitmap)
        p.bitmap, p.bitmap_hot, p.bitmap_dma = hot + dma + swept, hot, dma
        p.dirty_bytes_last_sync = p.bitmap
        p.swept = p.cpu_s = p.wall_s = 0.0
        p.syncs += 1
        p.period_dirty += new
        now = self.clock.t
        if now > p.period_start + THROTTLE_PERIOD_S:
            xfer = p.transferred - p.xfer_prev
            threshold = vm.qemu.params["throttle-trigger-threshold"]
            if p.period_dirty > xfer * threshold / 100:
                p.high += 1
                if p.high >= 2:
                    p.high = 0
                    if vm.qemu.caps["auto-converge"]:
                        q = vm.qemu
                        q.throttle_pct = (
                            min(
                                q.throttle_pct + q.params["cpu-throttle-increment"],
                                q.params["max-cpu-throttle"],
                            )
                            if q.throttle_pct
                            else q.params["cpu-throttle-initial"]
                        )
            p.dirty_pages_rate = int(p.period_dirty / PAGE / (now - p.period_start))
            p.period_start, p.period_dirty, p.xfer_prev = now, 0.0, p.transferred

    def _switchover(self, vm: FakeVm, p: Precopy) -> None:
        rate = max(p.mbps * 1e6 / 8, 1.0)
        p.downtime_ms = round(p.bitmap / rate * 1000 + self.link.rtt_ms)
        p.transferred += p.bitmap
        p.bitmap = 0.0
        p.total_time_ms = round((self.clock.t - p.started) * 1000)
        vm.migration, vm.runstate, vm.qemu.throttle_pct = "completed", "postmigrate", 0
        vm.transferred = int(p.transferred)
        dst = self._destination(vm.spec.name)
        if dst is not None:
            dst.runstate, dst.migration = "running", "completed"

    def _destination(self, name: str) -> FakeVm | None:
        for h in self.hosts:
            v = self.vms[h].get(name)
            if v is not None and v.runstate == "inmigrate":
                return v
        return None

    def _stats(self, vm: FakeVm) -> dict[str, Any]:
        p = vm.precopy
        if p is not None:
            stats = MigrationStats(
                status=vm.migration,
                transferred=int(p.transferred),
                remaining=int(p.bitmap),
                total=p.memory,
                mbps=round(p.mbps, 3),
                dirty_pages_rate=p.dirty_pages_rate,
                page_size=PAGE,
                passes=p.syncs,
                throttle_pct=vm.qemu.throttle_pct,
                expected_downtime_ms=p.expected_downtime_ms if vm.migration == "active" else None,
                total_time_ms=p.total_time_ms,
                downtime_ms=p.downtime_ms,
                setup_time_ms=2,
            )
            return stats.model_dump(mode="json")
        done = vm.migration == "completed"
        stats = MigrationStats(
            status=vm.migration,
            transferred=vm.transferred,
            remaining=GUEST_BYTES - vm.transferred,
            total=GUEST_BYTES,
            total_time_ms=300 if done else None,
            downtime_ms=5 if done else None,
            setup_time_ms=2 if vm.migration != "none" else None,
        )
        return stats.model_dump(mode="json")

    def _info(self, host: str, vm: FakeVm) -> VmInfo:
        state = {
            "running": VmState.RUNNING,
            "inmigrate": VmState.PAUSED,
            "postmigrate": VmState.PAUSED,
            "paused": VmState.PAUSED,
        }.get(vm.runstate, VmState.STOPPED)
        return VmInfo(
            name=vm.spec.name,
            uuid=vm.spec.uuid,
            host=host,
            state=state,
            qemu_status=vm.runstate,
            spec=vm.spec,
        )

    def host_facts(self, host: str) -> dict[str, Any]:
        return {**_facts(), "name": host, **self.facts_override.get(host, {})}

    def _metrics(self, host: str) -> dict[str, Any]:
        """The agent's usage sample: each VM with a QEMU (running, paused, incoming or
        migrated away, as the agent samples every QEMU process) at its scripted CPU load when
        it runs, idle otherwise."""
        vms = [
            VmMetrics(
                name=name,
                cpu_percent=self.cpu_percent.get(name, 0.0) if v.runstate == "running" else 0.0,
                rss_bytes=v.spec.memory << 20,
                memory_mib=v.spec.memory,
                dirty_rate_mib_s=self.dirty_rate.get(name),
            )
            for name, v in self.vms[host].items()
            if v.runstate != "gone"
        ]
        facts = self.host_facts(host)
        return HostMetrics(
            sampled_at=utcnow(),
            cpus=facts["cpus"],
            cpu_percent=0.0,
            memory_total_bytes=facts["memory_bytes"],
            memory_available_bytes=facts["memory_bytes"],
            vms_memory_mib=sum(v.memory_mib for v in vms),
            vms=vms,
        ).model_dump(mode="json")

    # ---------------------------------------------------------------- setting up

    def add_running_vm(
        self,
        db: Database,
        name: str,
        host: str,
        memory_mib: int = 256,
        guest: Guest | None = None,
        disks: list[Disk] | None = None,
    ) -> None:
        """A running VM on ``host``, in the world and in the manager's inventory; with
        ``guest``, its migrations are paced by what it writes."""
        spec = VmSpec(
            name=name,
            memory=f"{memory_mib}M",
            nics=[Nic(mac=f"52:54:00:{sum(map(len, self.vms.values())):02x}:00:{len(name):02x}")],
            guest=GuestConfig(),
            cpu_model="qemu64",
            machine="pc-i440fx-10.0",
            disks=disks or [],
        )
        self.vms[host][name] = FakeVm(spec=spec, runstate="running")
        self.files[host] |= {f"{d.datastore}:{d.path}" for d in spec.disks}
        if guest is not None:
            self.guests[name] = guest
        with db.session() as s:
            h = s.query(Host).filter_by(name=host).one()
            s.add(
                Vm(
                    name=name,
                    uuid=str(spec.uuid),
                    mac=spec.nics[0].mac,
                    host=h,
                    state="running",
                    spec=spec.model_dump(mode="json"),
                    memory_mib=memory_mib,
                )
            )

    def register_hosts(
        self, db: Database, facts: Callable[[str], dict[str, Any]] | None = None
    ) -> None:
        """The world's hosts in the manager's database; ``facts`` per host, or the default."""
        with db.session() as s:
            for h in self.hosts:
                s.add(
                    Host(
                        name=h,
                        agent_url=f"http://agent-{h}.test:7100",
                        token="t" * 32,
                        state="up",
                        facts=facts(h) if facts is not None else self.host_facts(h),
                        last_seen=utcnow(),
                    )
                )

    async def run_to_end(self, runner: TaskRunner, task: TaskOut) -> TaskOut:
        """Poll the task runner until ``task`` ends (bounded)."""
        for _ in range(4000):
            t = runner.get(task.id)
            if not t.state.active:
                return t
            await asyncio.sleep(0.005)
        raise AssertionError("the task never ended")


def _host_of(url: str) -> str:
    return re.sub(r"^http://agent-([a-z0-9]+)\.test.*$", r"\1", url)


def _facts() -> dict[str, Any]:
    return {
        "name": "h",
        "cpu_model": "qemu64",
        "cpu_flags": [],
        "cpus": 8,
        "agent_version": "test",
        "memory_bytes": 64 << 30,
        "cpu_models": ["qemu64"],
        "machine_types": ["pc-i440fx-10.0"],
        "machine_aliases": {"pc": "pc-i440fx-10.0"},
        "bridges": ["vmbr0"],
        "datastores": [],
        "accel": AccelInfo(name="tcg", reason="test").model_dump(mode="json"),
        "qemu_version": "10.0.2",
    }


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def _error(status: int, code: str, message: str, vm: str | None = None) -> httpx.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, vm=vm))
    return httpx.Response(status, json=body.model_dump())
