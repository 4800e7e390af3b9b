"""The scripted agents under the campaign's faults, with the invariants watched at every request.

At each agent request a fault may strike (``Fault``), decided by the campaign's plan for that
request's key (host, method, path, and how many such requests came before it): so a schedule
replays the same faults on the same requests, and one that lost an unrelated operation (when
it is shrunk) still does on the requests that matter. What a fault does mirrors what happens
to the real agent and manager:

- ``5xx``: the agent answers 503 and did nothing; ``5xx-after``: it did the work, then failed
  (500): the manager cannot tell which;
- ``timeout``: the agent did the work, the answer never came; the manager waited its client's
  timeout (in simulated time);
- ``unreachable``: this request and every other one to that agent for ``seconds`` get no
  connection (the agent and its QEMUs run on: its peer calls still go);
- ``agent-restart``: the agent dies as the request arrives (having done it or not), answers
  nothing for ``seconds`` and starts again (``Cluster.restart_agent``: its records on disk
  and its QEMUs survive, what it held in memory does not);
- ``complete``: QEMU completes ``vm``'s migration at that moment (as the stream would);
- ``manager-restart``: the manager dies as it sends the request (sent or not): nothing it does
  from then on reaches the agents or its database (``ManagerCrashed``); the campaign starts a
  new one on the same database.

The invariants of every moment (tests.unit.campaign.invariants) are checked on every request
(``watch``, run as the world's ``before_request`` hook and again after each answer), and
whenever the agents' outages end or QEMU completes a stream by itself.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import httpx
from pydantic import ValidationError

from qmotion.server.agents import AgentConnector
from tests.unit.agent_world import FakeVm, QmpError, World, _error
from tests.unit.agent_world.wire import _host_of
from tests.unit.campaign.invariants import Memory, moment

REQUEST_S = 0.002
MAX_TIMEOUT_S = 120.0
# A stream nobody polls still ends: QEMU sends the (idle) guest's memory within seconds.
STREAM_S = 30.0
Key = tuple[str, str, str, int]  # host, method, path, occurrence of that request


class Fault(StrEnum):
    ERROR = "5xx"
    ERROR_AFTER = "5xx-after"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    AGENT_RESTART = "agent-restart"
    COMPLETE = "complete"
    MANAGER_RESTART = "manager-restart"


@dataclass(frozen=True)
class Injected:
    fault: Fault
    done: bool = False  # the request was performed before its answer was lost
    seconds: float = 0.0  # unreachable or down this long
    vm: str | None = None  # whose QEMU completes


Plan = Callable[[Key, "CampaignWorld"], Injected | None]


class ManagerCrashed(BaseException):
    """The manager process died (as with SIGKILL): a BaseException, so that no handler of the
    manager's turns it into an outcome it would record."""


@dataclass
class CampaignWorld(World):
    shared: frozenset[str] = frozenset({"shared"})  # datastores every host sees
    shared_files: set[str] = field(default_factory=set)
    plan: Plan | None = None
    faults_on: bool = False
    injected: list[tuple[Key, Injected]] = field(default_factory=list)
    seen_keys: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter
    )
    down_until: dict[str, float] = field(default_factory=dict)
    unreachable_until: dict[str, float] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)  # manager generations that crashed
    on_crash: Callable[[int], None] | None = None
    violations: list[str] = field(default_factory=list)
    # Shared-nothing sources whose agent (and so the watcher that continues QEMU past
    # pre-switchover) restarted mid-stream: QEMU waits there and never completes.
    # VM -> the id of its shared-nothing migration whose source watcher died (per migration,
    # as the agent's record is: a later migration of the VM is not held).
    orphaned: dict[str, str | None] = field(default_factory=dict)
    memory: Memory = field(default_factory=Memory)  # which copy holds the newest memory
    checks: int = 0
    streams: dict[int, float] = field(default_factory=dict)  # a source's stream: since when

    def __post_init__(self) -> None:
        super().__post_init__()
        self.before_request = lambda w, k, host, path: self.watch(f"before request {k}")

    def share(self) -> None:
        """A file on a shared datastore is one file, seen from every host: what an agent did
        to it (``files[host]``) shows on all of them."""
        was = self.shared_files
        seen = [{f for f in self.files[h] if f.split(":", 1)[0] in self.shared} for h in self.hosts]
        added = set().union(*(s - was for s in seen))
        removed = set().union(*(was - s for s in seen))
        self.shared_files = (was | added) - removed
        for h, s in zip(self.hosts, seen, strict=True):
            self.files[h] -= s - self.shared_files
            self.files[h] |= self.shared_files

    # ---------------------------------------------------------------- the clock

    def _tick(self, seconds: float) -> None:
        """No scripted guests here: time jumps, then the agents' outages end when due."""
        if self.guests:
            super()._tick(seconds)
        else:
            self.clock.t += seconds
        self._expire()
        self._streams_end()

    def _streams_end(self) -> None:
        """Streams the manager does not poll (its task ended, or it died) complete anyway."""
        for here in self.vms.values():
            for name, v in sorted(here.items()):
                if v.migration != "active" or v.outgoing is None:
                    self.streams.pop(id(v), None)
                    continue
                since = self.streams.setdefault(id(v), self.clock.t)
                if self.clock.t - since >= STREAM_S:
                    self.complete(name)

    def advance(self, seconds: float) -> None:
        """The event loop's idle wait (tests.unit.campaign.simloop)."""
        with self.lock:
            self._tick(seconds)
            self.watch("while idle")

    def _expire(self) -> None:
        now = self.clock.t
        for host, until in sorted(self.unreachable_until.items()):
            if until <= now:
                self.unreachable.discard(host)
                del self.unreachable_until[host]
        for host, until in sorted(self.down_until.items()):
            if until <= now:
                del self.down_until[host]
                self.restart_agent(host)

    def restart_agent(self, host: str) -> None:
        """As the agent's start (agent.migration.migrate.settle_after_restart): besides the
        world's, a shared-nothing source whose watcher died is cancelled if it was already
        left waiting at pre-switchover, else it waits there from now on."""
        with self.lock:
            for name, v in self.vms[host].items():
                if v.migration != "active" or v.mirror is None:
                    continue
                if self.orphaned.get(name, "") == v.current:
                    del self.orphaned[name]
                    v.migration = "cancelling"
                    self._settle_cancel(name, v)
                else:
                    self.orphaned[name] = v.current
            super().restart_agent(host)

    def complete(self, vm: str) -> bool:
        src = next((h for h in self.hosts if self._sending(self.vms[h].get(vm))), None)
        if src is not None and self.orphaned.get(vm, "") == self.vms[src][vm].current:
            return False  # held at pre-switchover: only its (dead) watcher lets it go on
        return super().complete(vm)

    def _arrive(self, src: str, s: FakeVm, dst: str, d: FakeVm) -> None:
        """The destination's QEMU holds the source's memory as of its switchover."""
        self.memory.arrived(d, s)
        super()._arrive(src, s, dst, d)
        self.orphaned.pop(s.spec.name, None)

    def place(self, name: str, host: str) -> None:
        """A VM set up running on ``host``: the first epoch of its memory."""
        self.share()
        self.memory.place(name, self.vms[host][name])

    # ---------------------------------------------------------------- invariants

    def watch(self, where: str) -> None:
        """Every invariant of every moment (tests.unit.campaign.invariants); a break is
        recorded (the campaign stops at once and reports it)."""
        self.checks += 1
        for what in moment(self, self.memory, where):
            if what not in self.violations:
                self.violations.append(what)

    # ---------------------------------------------------------------- the seam, with faults

    def connector_of(self, generation: int) -> AgentConnector:
        """The agents as manager ``generation`` reaches them (nothing, once it crashed)."""

        def transport(url: str) -> httpx.BaseTransport:
            host = _host_of(url)
            return httpx.MockTransport(lambda req: self._serve(generation, host, req))

        return AgentConnector(transport=transport)

    def _serve(self, generation: int, host: str, req: httpx.Request) -> httpx.Response:
        with self.lock:
            if generation in self.dead:
                raise ManagerCrashed(f"manager {generation} is dead")
            k = len(self.requests)
            self.requests.append((host, req.method, req.url.path))
            self._tick(REQUEST_S)
            if self.before_request is not None:
                self.before_request(self, k, host, req.url.path)
            fault = self._fault(host, req)
            if fault is not None and fault.fault == Fault.COMPLETE:
                if fault.vm is not None:
                    self.complete(fault.vm)
                self.watch(f"QEMU of {fault.vm} completing at request {k}")
                fault = None
            if host in self.unreachable or host in self.down:
                raise httpx.ConnectError("connection refused", request=req)
            if fault is None:
                return self._answer_watched(host, req, k)
            return self._strike(generation, host, req, k, fault)

    def _fault(self, host: str, req: httpx.Request) -> Injected | None:
        what = (host, req.method, req.url.path)
        self.seen_keys[what] += 1
        if not self.faults_on or self.plan is None:
            return None
        key = (*what, self.seen_keys[what])
        fault = self.plan(key, self)
        if fault is not None:
            self.injected.append((key, fault))
        return fault

    def _strike(
        self, generation: int, host: str, req: httpx.Request, k: int, fault: Injected
    ) -> httpx.Response:
        now = self.clock.t
        if fault.fault == Fault.ERROR:
            return _error(503, "scripted_failure", "scripted 503")
        if fault.fault == Fault.UNREACHABLE:
            self.unreachable.add(host)
            self.unreachable_until[host] = max(
                self.unreachable_until.get(host, 0), now + fault.seconds
            )
            raise httpx.ConnectError("connection refused", request=req)
        if fault.fault in (Fault.AGENT_RESTART, Fault.MANAGER_RESTART):
            if fault.done:
                self._answer_watched(host, req, k)
            if fault.fault == Fault.AGENT_RESTART:
                self.down.add(host)
                self.down_until[host] = max(self.down_until.get(host, 0), now + fault.seconds)
                raise httpx.RemoteProtocolError("server disconnected", request=req)
            self.dead.add(generation)
            if self.on_crash is not None:
                self.on_crash(generation)  # at once: nothing of it may run on
            raise ManagerCrashed(f"manager {generation} died at request {k}")
        self._answer_watched(host, req, k)  # 5xx-after and timeout: the work was done
        if fault.fault == Fault.ERROR_AFTER:
            return _error(500, "scripted_failure", "scripted 500 after the work was done")
        timeout = req.extensions.get("timeout", {}).get("read") or MAX_TIMEOUT_S
        self._tick(min(float(timeout), MAX_TIMEOUT_S))
        self.watch(f"while request {k} timed out")
        raise httpx.ReadTimeout("timed out", request=req)

    def _answer_watched(self, host: str, req: httpx.Request, k: int) -> httpx.Response:
        try:
            return self._answer(host, req)
        except ValidationError as exc:
            return _error(422, "invalid_request", str(exc))
        except QmpError:
            return httpx.Response(500, text="Internal Server Error")
        finally:
            self._observe()
            self.share()
            self.watch(f"after request {k} ({host} {req.method} {req.url.path})")
