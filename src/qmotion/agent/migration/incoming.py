"""The destination's side of a live migration (libvirt's Dst steps): prepare QEMU to receive
the stream, watch the VM resume, steer the network to it, recover a broken postcopy stream.
Its Finish step (the word that lets a paused destination run, the confirmation, the teardown
by the migration's id) is ``finish``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import AgentError, Conflict, OperationFailed
from qmotion.agent.migration.finish import DestinationFinish, incoming_status
from qmotion.agent.migration.params import (
    AUTHZ,
    PAUSE_SETTLE_S,
    require_tls,
    stream_capabilities,
    stream_parameters,
    tls_parameters,
)
from qmotion.agent.network.steer import Steerer
from qmotion.agent.network.tapwatch import TapWatch
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.migration import IncomingRequest, IncomingResponse, PostcopyRecovery, SteerRequest
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import tap_name
from qmotion.migration.timeline import Stopwatch

log = logging.getLogger(__name__)
T = TypeVar("T")
EXPORTS_END_AFTER_S = 2.0  # shared-nothing: the destination's NBD exports, after its resume


class IncomingMigrations:
    """The migrations this host receives: one QEMU waiting per VM, its events, its steering."""

    def __init__(
        self, vms: VmManager, incoming_disks: IncomingDisks, tls: TlsStore | None = None
    ) -> None:
        self.vms = vms
        self.tls = tls
        self.incoming_disks = incoming_disks
        self.finish = DestinationFinish(vms, incoming_disks)
        self._ending: set[asyncio.Future[None]] = set()
        self._steerers: dict[str, asyncio.Future[Steerer]] = {}
        self._incoming_watch: dict[str, asyncio.Task[None]] = {}
        self._incoming_events: dict[str, list[tuple[str, float]]] = {}
        self._incoming_uri: dict[str, str] = {}  # where the stream came in: a recovery's too
        self._tapwatch: dict[str, TapWatch] = {}
        # pyroute2's sync API runs its own event loop: it must stay off the agent's loop
        # thread, and a Steerer is used from the thread that built it.
        self._netlink = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer")

    async def _in_netlink_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn)

    async def incoming(self, req: IncomingRequest) -> IncomingResponse:
        """Define the VM here and start QEMU waiting for the stream; returns where to send it."""
        spec = req.spec
        watch = Stopwatch()
        address = self.vms.config.address
        if not address:
            raise OperationFailed("this agent has no address to receive migrations on")
        require_tls(self.tls, req.params)
        # The destination never creates a disk from the definition: a datastore said shared
        # but not mounted here must fail the migration, not grow an empty disk under the VM.
        spec = spec.model_copy(
            update={
                "disks": [
                    d.model_copy(update={"create_size": None, "create_from": None})
                    for d in spec.disks
                ]
            }
        )
        made: list[Disk] = []
        if req.copy_disks is not None:
            with watch.step("create disks"):
                spec, made = await self.incoming_disks.create(spec, req.copy_disks)
        try:
            with watch.step("define"):
                await self.vms.define(spec)
        except BaseException:
            self.incoming_disks.remove(made)
            raise
        nbd = None
        # Paused (-S) only for a migration with an id: the word that lets it run names it.
        paused = req.migration_id is not None and req.params.destination_start == "paused"
        try:
            if made:
                self.incoming_disks.own(spec.name, made)
            # Before QEMU starts: a restarted agent knows which migration it waits for.
            self.vms.records.begin_incoming(
                spec.name,
                req.migration_id,
                "paused" if paused else "auto",
                [str(a) for a in req.source],
            )
            with watch.step("start QEMU"):
                await self.vms.launch(spec.name, incoming="defer", paused=paused)
            mon = self.vms.monitor(spec.name)
            with watch.step("capabilities"):
                await mon.execute(
                    "migrate-set-capabilities",
                    {"capabilities": stream_capabilities(req.params, source=False)},
                )
            with watch.step("TLS credentials", timed=req.params.tls):
                tls = await tls_parameters(mon, self.tls, req.params, "server", req.source_host)
            with watch.step("parameters"):
                await mon.execute("migrate-set-parameters", stream_parameters(req.params) | tls)
            events = self._watch(spec.name, mon)
            # The address the manager chose (the first the source reaches); else the
            # preferred one. Never all interfaces: whoever connects first would be the stream.
            addresses = [*self.vms.config.migration_addresses, address]
            wanted = str(req.address) if req.address is not None else None
            listen = wanted if wanted in addresses else addresses[0]
            with watch.step("listen"):
                await mon.execute("migrate-incoming", {"uri": f"tcp:{listen}:0"})
                info = await mon.execute("query-migrate")
            port = int(info["socket-address"][0]["port"])
            if req.copy_disks is not None:
                # On the stream's address, with the stream's credentials.
                nbd = await self.incoming_disks.export(
                    spec.name,
                    mon,
                    listen,
                    [d.index for d in req.copy_disks.disks],
                    "qm-tls-server" if req.params.tls else None,
                    AUTHZ if req.params.tls and req.source_host else None,
                )
        except (HypervisorError, KeyError, IndexError, AgentError, OSError) as exc:
            await self.vms.delete(spec.name, force=True)
            await self.forget(spec.name)  # its watcher would wait on a monitor that is gone
            raise OperationFailed(
                f"preparing incoming migration of {spec.name} failed: {exc}; "
                "the destination was removed",
                vm=spec.name,
                qmp_class=getattr(exc, "qmp_class", None),
            ) from exc
        with watch.step("watch taps"):
            await self._watch_taps(spec, events)
        # Steering is needed only at switchover: get it ready after answering.
        await self._drop_steerer(spec.name)
        self._steerers[spec.name] = asyncio.ensure_future(
            self._in_netlink_thread(
                lambda: Steerer(
                    [n.mac for n in spec.nics],
                    [tap_name(spec, i) for i in range(len(spec.nics))],
                    [n.bridge for n in spec.nics],
                )
            )
        )
        self._incoming_uri[spec.name] = f"tcp:{listen}:{port}"
        return IncomingResponse(
            uri=f"tcp:{listen}:{port}", port=port, addresses=[listen], nbd=nbd, steps=watch.steps
        )

    async def check_incoming(self, req: IncomingRequest) -> None:
        """What ``incoming`` would refuse about the disks it is to create; changes nothing."""
        if req.copy_disks is None:
            return
        if req.spec.name in self.vms.names():
            raise Conflict(
                f"a VM named {req.spec.name!r} is already defined on host "
                f"{self.vms.config.name} (left by an earlier attempt? delete it there first)",
                vm=req.spec.name,
                field="to",
            )
        await asyncio.to_thread(self.incoming_disks.check, req.spec, req.copy_disks)

    def _watch(self, name: str, mon: Monitor) -> list[tuple[str, float]]:
        """Follow the incoming stream of ``name`` (its events, into the list returned)."""
        events: list[tuple[str, float]] = []
        self._incoming_events[name] = events
        old = self._incoming_watch.pop(name, None)
        if old is not None:
            old.cancel()
        self._incoming_watch[name] = asyncio.create_task(
            self._watch_incoming(name, mon, events), name=f"incoming-{name}"
        )
        return events

    async def settle_after_restart(self, name: str, mon: Monitor) -> None:
        """At agent start: a paused destination told to run whose stream completed (or went
        postcopy) runs now; one still loading is followed again (the word it may get, or got,
        is acted on when it completes). A VM that resumed here owns its disks."""
        status = await self.finish.settle_after_restart(name, mon)
        if status is not None and status not in ("completed", "failed", "cancelled"):
            self._watch(name, mon)
        if self.vms.incoming_disks(name) and await mon.status() == "running":
            await self.incoming_disks.end(name)

    async def forget(self, name: str) -> None:
        """The VM is gone from this host: nothing of its incoming migration is followed."""
        watch = self._incoming_watch.pop(name, None)
        if watch is not None:
            watch.cancel()
        tapwatch = self._tapwatch.pop(name, None)
        if tapwatch is not None:
            tapwatch.close()
        self._incoming_events.pop(name, None)
        self._incoming_uri.pop(name, None)
        await self._drop_steerer(name)

    async def _watch_taps(self, spec: VmSpec, events: list[tuple[str, float]]) -> None:
        """The switchover's last marks (first frames after the resume), into this
        migration's events; a report figure only, so a tap that cannot be watched costs
        nothing else."""
        old = self._tapwatch.pop(spec.name, None)
        if old is not None:
            old.close()
        taps = [tap_name(spec, i) for i in range(len(spec.nics))]
        macs = [n.mac for n in spec.nics]
        try:
            # Opening packet sockets takes milliseconds: off the loop other switchovers use.
            def record(kind: str, at: float) -> None:
                events.append((kind, at))  # from the watch thread: list.append is atomic

            self._tapwatch[spec.name] = await asyncio.to_thread(TapWatch, taps, macs, record)
        except Exception as exc:
            log.warning("first frames of %s not watched: %s", spec.name, exc)

    async def _watch_incoming(
        self, name: str, mon: Monitor, events: list[tuple[str, float]]
    ) -> None:
        """Record when the destination really resumes: the source's figures end earlier."""
        resumed_wall: float | None = None
        try:
            with (
                contextlib.suppress(HypervisorError),
                mon.listen("MIGRATION", "RESUME") as listener,
            ):
                # A status reached before this watch began (the agent restarted) counts too.
                self.finish.on_incoming_status(name, mon, await incoming_status(mon))
                async for event in listener:
                    if event["event"] == "RESUME":
                        # QEMU's own timestamp (wall clock), on the agent's monotonic clock:
                        # the event reaches this loop a moment later.
                        ts = event.get("timestamp")
                        if isinstance(ts, dict):
                            resumed_wall = ts["seconds"] + ts["microseconds"] / 1e6
                        at = time.monotonic()
                        if resumed_wall is not None:
                            at -= max(time.time() - resumed_wall, 0.0)
                        events.append(("resumed", at))
                        # A destination that ran by itself (auto) is marked as it is seen;
                        # one started paused was marked before its cont.
                        with contextlib.suppress(OSError):
                            self.vms.records.mark_ran(name)
                        # It runs on the copied disks: they are its own from now on. The
                        # exports end a moment later: QMP work in this QEMU's main loop
                        # now would compete with the guest's first frames.
                        ending = asyncio.ensure_future(
                            self.incoming_disks.end(name, after_s=EXPORTS_END_AFTER_S)
                        )
                        self._ending.add(ending)
                        ending.add_done_callback(self._ending.discard)
                        return
                    data = event["data"]
                    assert isinstance(data, dict)
                    status = str(data["status"])
                    events.append((status, time.monotonic()))
                    self.finish.on_incoming_status(name, mon, status)
                    if status in ("failed", "cancelled"):
                        return
        finally:
            # Whatever ended the watch (resume, failure, a lost monitor, cancellation), the
            # tap watch is armed or stopped: never left polling.
            watch = self._tapwatch.pop(name, None)
            if watch is not None:
                if resumed_wall is not None:
                    watch.resumed(resumed_wall)  # it ends once it saw both frames
                else:
                    watch.close()

    def receiving(self) -> list[str]:
        """The VMs whose incoming stream is followed still: not yet resumed here, nor failed
        or cancelled."""
        return sorted(n for n, watch in self._incoming_watch.items() if not watch.done())

    def events(self, name: str) -> list[tuple[str, float]] | None:
        """What the incoming migration of ``name`` went through (status, monotonic time)."""
        return self._incoming_events.get(name)

    async def _drop_steerer(self, name: str) -> None:
        pending = self._steerers.pop(name, None)
        if pending is not None:
            with contextlib.suppress(Exception):
                await self._in_netlink_thread((await pending).close)

    async def steer(self, name: str, req: SteerRequest) -> float:
        """Point the network at this host's taps for the incoming VM; returns milliseconds."""
        start = time.monotonic()
        spec = self.vms.spec(name)
        if sorted(n.mac for n in spec.nics) != sorted(m.lower() for m in req.mac):
            raise Conflict(f"MACs {req.mac} are not those of VM {name}", vm=name, field="mac")
        pending = self._steerers.pop(name, None)
        if pending is None:
            raise Conflict(f"VM {name} has no incoming migration here to steer to", vm=name)
        try:
            steerer = await pending
        except OSError as exc:
            raise OperationFailed(f"cannot steer traffic to {name}: {exc}", vm=name) from exc

        def fire_and_close() -> None:
            try:
                steerer.fire()
            finally:
                steerer.close()

        await self._in_netlink_thread(fire_and_close)
        return (time.monotonic() - start) * 1000

    async def recover_incoming(
        self, name: str, req: PostcopyRecovery | None = None
    ) -> PostcopyRecovery:
        """Destination: listen again for a broken postcopy stream, where it came in before.

        Out of band only: the destination's main loop may be blocked on a page that the
        broken stream was to bring (a device writing into guest memory), and with it every
        ordinary QMP command, ``query-migrate`` included."""
        mon = self.vms.monitor(name)
        # Ours if this agent prepared it; else the manager's record (this agent restarted).
        uri = self._incoming_uri.get(name) or (req.uri if req is not None else None)
        if uri is None:
            raise Conflict(f"VM {name} has no incoming migration here to recover", vm=name)
        events = self._incoming_events.get(name)
        if events is not None and not any(status == "resumed" for status, _ in events):
            # Still loading the device state (its pages fault in over this very stream): QEMU
            # 10.0 cannot recover a stream broken before the destination runs; it exits
            # ("loadvm failed", seen in the lab). A stalled stream may still come back.
            raise Conflict(
                f"the destination of {name} has not resumed yet (device state loading): "
                "pausing its stream now would end it",
                vm=name,
            )
        # A stream that still looks alive (TCP notices a dead link only after minutes) is
        # shut down; one already paused makes QEMU refuse, which is fine.
        with contextlib.suppress(HypervisorError):
            await mon.execute("migrate-pause", oob=True)
        with contextlib.suppress(HypervisorError):
            # A reconnection stuck in its setup (a TLS handshake on a half-dead link) is not
            # pausable; yanking its channel sends QEMU back to postcopy-paused.
            await mon.execute("yank", {"instances": [{"type": "migration"}]}, oob=True)
        deadline = time.monotonic() + PAUSE_SETTLE_S
        while True:
            try:
                # While paused QEMU drops any listener of an earlier attempt first: asking
                # again (the source could not reach it) is safe.
                await mon.execute("migrate-recover", {"uri": uri}, oob=True)
                return PostcopyRecovery(uri=uri)
            except HypervisorError as exc:
                if time.monotonic() > deadline:
                    raise OperationFailed.of(
                        exc, vm=name, what=f"recovering the incoming migration of {name}"
                    ) from exc
            await asyncio.sleep(0.1)
