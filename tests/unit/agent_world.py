"""Scripted host agents served in-process (httpx MockTransport) for the manager's real port.

The world keeps, per host, each VM's QEMU run state and migration status, and answers the
agent API as the real agent does (qmotion.agent.migrate): ``resume`` refuses a VM that
migrated away (409 ``migrated_away``) or is still migrating, ``release`` refuses unless QEMU
is ``postmigrate``, a cancelled migration ends the destination's incoming QEMU. Like QEMU, a
migration completes only from ``active``: once ``cancelling`` it ends ``cancelled``.

Tests inject the races that matter through ``before_request``: complete the migration, or
make a host unreachable, just before the k-th request, for every k.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.api.host import AccelInfo
from qmotion.api.migration import MigrationStats
from qmotion.api.vm import GuestConfig, Nic, VmInfo, VmSpec, VmState
from qmotion.server.agents import AgentConnector
from qmotion.server.db import Database, Host, Vm, utcnow

MIB = 1 << 20
GUEST_BYTES = 256 * MIB


@dataclass
class FakeVm:
    spec: VmSpec
    runstate: str  # QEMU's: running, inmigrate, postmigrate, paused; gone: QEMU exited
    migration: str = "none"  # QEMU's migration status on this side
    transferred: int = 0
    polls: int = 0
    started: float = 0.0


@dataclass
class World:
    """Two or more hosts' agents and their QEMUs, behind one lock (handlers run in threads)."""

    hosts: tuple[str, ...] = ("h1", "h2")
    polls_to_complete: int = 3  # progress queries before QEMU completes on its own
    duration_s: float = 0.0  # and at least this long after migrate was issued
    vms: dict[str, dict[str, FakeVm]] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    before_request: Callable[[World, int, str, str], None] | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    max_active_per_host: dict[str, int] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        for h in self.hosts:
            self.vms.setdefault(h, {})

    # ---------------------------------------------------------------- what tests look at

    def running_copies(self, vm: str) -> list[str]:
        return [h for h in self.hosts if self._state(h, vm) == "running"]

    def _state(self, host: str, vm: str) -> str | None:
        v = self.vms[host].get(vm)
        return v.runstate if v else None

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
        host = re.sub(r"^http://agent-([a-z0-9]+)\.test.*$", r"\1", url)

        def handle(request: httpx.Request) -> httpx.Response:
            with self.lock:
                k = len(self.requests)
                self.requests.append((host, request.method, request.url.path))
                if self.before_request is not None:
                    self.before_request(self, k, host, request.url.path)
                if host in self.unreachable:
                    raise httpx.ConnectError("connection refused", request=request)
                try:
                    return self._answer(host, request)
                finally:
                    self._observe()

        return handle

    def _answer(self, host: str, req: httpx.Request) -> httpx.Response:
        path, method = req.url.path, req.method
        here = self.vms[host]
        if path == "/v1/migrations/incoming" and method == "POST":
            spec = VmSpec.model_validate(json.loads(req.content)["spec"])
            here[spec.name] = FakeVm(spec=spec, runstate="inmigrate")
            return _json({"uri": f"tcp:198.18.0.{len(host)}:4444"})
        m = re.fullmatch(r"/v1/vms/([a-z0-9-]+)(/.*)?", path)
        if m is None:
            return _error(404, "not_found", f"no route {path}")
        name, rest = m.group(1), m.group(2) or ""
        vm = here.get(name)
        if vm is None:
            return _error(404, "vm_not_found", f"no VM named {name!r} on this host", vm=name)
        if method == "GET" and rest == "":
            return _json(self._info(host, vm).model_dump(mode="json"))
        if method == "DELETE" and rest == "":
            del here[name]
            return httpx.Response(204)
        if method == "POST" and rest == "/migration":
            vm.migration, vm.polls, vm.started = "active", 0, time.monotonic()
            return _json(self._stats(vm))
        if method == "GET" and rest == "/migration":
            if vm.migration == "active":
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
            return _json({"qemu_status": vm.runstate})
        if method == "POST" and rest == "/release":
            if vm.runstate != "postmigrate":
                return _error(409, "conflict", f"VM {name} is {vm.runstate} here, not migrated")
            del here[name]
            return httpx.Response(204)
        if method == "POST" and rest == "/announce":
            return httpx.Response(204)
        return _error(404, "not_found", f"no route {method} {path}")

    def _settle_cancel(self, name: str, vm: FakeVm) -> None:
        vm.migration = "cancelled"
        # The destination's incoming migration fails with the stream: its QEMU exits.
        for h in self.hosts:
            other = self.vms[h].get(name)
            if other is not None and other.runstate == "inmigrate":
                other.runstate = "gone"

    def _stats(self, vm: FakeVm) -> dict[str, Any]:
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

    # ---------------------------------------------------------------- setting up

    def add_running_vm(self, db: Database, name: str, host: str, memory_mib: int = 256) -> None:
        """A running VM on ``host``, in the world and in the manager's inventory."""
        spec = VmSpec(
            name=name,
            memory=f"{memory_mib}M",
            nics=[Nic(mac=f"52:54:00:00:{len(self.vms[host]):02x}:{len(name):02x}")],
            guest=GuestConfig(),
            cpu_model="qemu64",
            machine="pc-i440fx-10.0",
        )
        self.vms[host][name] = FakeVm(spec=spec, runstate="running")
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

    def register_hosts(self, db: Database) -> None:
        with db.session() as s:
            for h in self.hosts:
                s.add(
                    Host(
                        name=h,
                        agent_url=f"http://agent-{h}.test:7100",
                        token="t" * 32,
                        state="up",
                        facts=_facts(),
                        last_seen=utcnow(),
                    )
                )


def _facts() -> dict[str, Any]:
    return {
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
