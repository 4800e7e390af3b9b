"""The world tests drive: the cluster's agents served through MockTransport, and the manager."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from qmotion.api.server import TaskOut
from qmotion.api.vm import Disk, GuestConfig, Nic, VmSpec
from qmotion.server.agents import AgentConnector
from qmotion.server.db import Database, Host, Vm, utcnow
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world.agent import answer
from tests.unit.agent_world.cluster import Cluster, FakeVm
from tests.unit.agent_world.qemu import Guest, QmpError
from tests.unit.agent_world.wire import _error, _host_of

REQUEST_S = 0.002  # what one agent request costs, in simulated time


@dataclass
class World(Cluster):
    """The cluster's agents, served in-process to the manager's connector, and the manager's
    database set up to match.

    A World is a Cluster with the seam added: the transport, where tests script races
    (``before_request``) and failures (``fail_next``), and the manager's side. The routes
    (agent.py, migrations.py, nbd.py) see only the Cluster; a test may override ``_answer`` to
    serve more routes."""

    before_request: Callable[[World, int, str, str], None] | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    # (method, path) -> statuses to answer instead, one per request, in order.
    fail_next: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # (host, method, path) -> the status that host's agent always answers instead.
    fail_always: dict[tuple[str, str, str], int] = field(default_factory=dict)

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
                if host in self.unreachable or host in self.down:
                    raise httpx.ConnectError("connection refused", request=request)
                always = self.fail_always.get((host, request.method, request.url.path))
                if always is not None:
                    return _error(always, "scripted_failure", f"scripted {always}")
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
        return answer(self, host, req)

    def runner(self, db: Database, cls: type[TaskRunner] = TaskRunner, **kw: Any) -> TaskRunner:
        """The manager's task runner (``cls``) over this world's agents, on its simulated
        clock (its waits and timeouts pass in simulated time)."""
        return cls(
            db, Inventory(db, self.connector()), clock=self.clock.monotonic, sleep=self.sleep, **kw
        )

    async def sleep(self, seconds: float) -> None:
        """The manager's waits (its retries' backoffs, its polls) in simulated time: hand it
        to the task runner as its ``sleep``, with ``clock.monotonic`` as its clock."""
        with self.lock:
            self._tick(seconds)
        await asyncio.sleep(0)

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
