"""The source's side of a live migration (libvirt's Src steps): send the VM, follow the stream,
steer the network at switchover, give the paused destination the word to run; tune or cancel
it; reconnect a postcopy stream. Releasing or resuming the source after it is ``confirm``'s.

The manager drives the sequence; the agent does what must be fast or local: it watches QMP
events, and at switchover (``pause-before-switchover``) it calls the destination agent directly
to steer the network, then lets QEMU continue, so the pause costs one LAN round trip. Once its
QEMU completed (``postmigrate``: it never resumes by itself) it tells the destination to run.
Every migration is recorded by the manager's id before ``migrate`` is issued
(``agent.vms.migration_record``): the agent answers for that id only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import Conflict, InPostcopy, OperationFailed
from qmotion.agent.migration.guard import (
    ENDS,
    destroy_sockets_to,
    follow_and_guard,
    guard_switchover,
)
from qmotion.agent.migration.params import (
    PAUSE_SETTLE_S,
    require_tls,
    stream_capabilities,
    stream_parameters,
    tls_parameters,
    tune_parameters,
)
from qmotion.agent.migration.peer import PeerConnector, finish_on_peer
from qmotion.agent.network.forwarder import FORWARD_FOR_S, LateFrameForwarder
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.agent.vms.migration_record import outgoing_status
from qmotion.api.migration import (
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PostcopyRecovery,
    QemuMigrationStatus,
)
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import tap_name
from qmotion.migration.convergence import THROTTLE_INCREMENT
from qmotion.migration.timeline import Stopwatch

log = logging.getLogger(__name__)
FINISHED = ("completed", "failed", "cancelled")
POSTCOPY_RECOVERING = ("postcopy-recover-setup", "postcopy-recover")
POSTCOPY_LIVE = ("postcopy-active", *POSTCOPY_RECOVERING)
STEER_WAIT_S = 2.0
SETTLE_ANSWER_S = 5.0  # at agent start: a source that does not answer by then is stuck
CANCEL_SETTLE_S = 1.0  # a cancel that has not settled by then is stuck on a dead link
SETUP_WAIT_S = 10.0  # a cancel waits this long for QEMU to finish setting the stream up
IncomingEvents = Callable[[str], list[tuple[str, float]] | None]


@dataclass
class Outgoing:
    """One outgoing migration, as its watcher follows QEMU's events."""

    started_at: float
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "setup"
    steer_ms: float | None = None
    steer_error: str | None = None
    task: asyncio.Task[None] | None = None
    events: list[tuple[str, float]] = field(default_factory=list)
    restore_increment_at: int | None = None  # throttle % after which QEMU's step is reset
    uri: str | None = None  # where the stream goes (tcp:HOST:PORT)
    mirror_error: str | None = None  # the disks could not end in sync: the stream cancelled
    steering: asyncio.Task[None] | None = None  # the switchover call, from the source's STOP
    migration_id: str | None = None  # the manager's id (as recorded before migrate)
    stopped_at: float | None = None  # the source's STOP (monotonic)
    finish_ms: float | None = None  # source STOP to the destination told to run
    finish_error: str | None = None
    finishing: asyncio.Task[None] | None = None  # the word to the destination
    # The switchover's guard (agent.migration.guard): the downtime limit as last set, and
    # since when the guest has been paused in a guarded status (None: not guarded now).
    downtime_limit_ms: int = 300
    stuck_since: float | None = None
    guard: asyncio.Task[None] | None = None
    guard_error: str | None = None


class OutgoingMigrations:
    """The migrations this host sends: one ``Outgoing`` record per VM, kept after the end
    (a resume or release asks how it went). The stats route serves both ends: a VM with no
    outgoing record here reports its incoming events (``incoming_events``)."""

    def __init__(
        self,
        vms: VmManager,
        nbd: NbdMirrors,
        incoming_disks: IncomingDisks,
        peers: PeerConnector,
        incoming_events: IncomingEvents,
        tls: TlsStore | None = None,
    ) -> None:
        self.vms = vms
        self.tls = tls
        self.nbd = nbd
        self.incoming_disks = incoming_disks
        self.peers = peers
        self._incoming_events = incoming_events
        self._outgoing: dict[str, Outgoing] = {}

    async def outgoing(self, name: str, req: OutgoingRequest) -> MigrationStats:
        """Start sending the VM to ``req.uri``; returns at once, a watcher follows QMP events."""
        watch = Stopwatch()
        mon = self.vms.monitor(name)
        current = self._outgoing.get(name)
        if current is not None and current.status not in FINISHED:
            raise Conflict(f"VM {name} is already migrating", vm=name)
        if (reason := self.vms.storage_guard(name)) is not None:
            # The destination would open the disks the definition names: maybe not QEMU's.
            raise Conflict(f"VM {name} cannot migrate now: {reason}", vm=name)
        status = await mon.status()
        if status not in ("running", "paused"):
            raise Conflict(f"VM {name} cannot migrate while {status}", vm=name)
        require_tls(self.tls, req.params)
        if req.params.copy_datastore is None:
            await self.nbd.void(name)  # an earlier copy's record must not outlive it
        elif not self.nbd.active(name):
            # Without its mirror the destination would run on empty disks.
            raise Conflict(
                f"VM {name} has no disk mirror to its destination: the disks must be copied first",
                vm=name,
            )
        if req.params.copy_datastore is not None:
            mirror = await self.nbd.status(name)
            if not mirror.synced or any(not d.actively_synced for d in mirror.disks):
                raise Conflict(
                    f"the disks of {name} are not in sync with the destination yet "
                    f"({mirror.phase}, {mirror.remaining_bytes} bytes to copy)",
                    vm=name,
                )
            # The mirrors must end in sync while the guest is paused, before the device
            # state leaves: QEMU stops there for it.
            req = req.model_copy(
                update={"params": req.params.model_copy(update={"pause_before_switchover": True})}
            )
        watch.add("checks", watch.origin, watch.clock())
        with watch.step("capabilities"):
            await mon.execute(
                "migrate-set-capabilities",
                {"capabilities": stream_capabilities(req.params, source=True)},
            )
        try:
            with watch.step("TLS credentials", timed=req.params.tls):
                tls = await tls_parameters(mon, self.tls, req.params, "client")
        except HypervisorError as exc:
            raise OperationFailed.of(exc, vm=name, what=f"setting up TLS for {name}") from exc
        with watch.step("parameters"):
            await mon.execute("migrate-set-parameters", stream_parameters(req.params) | tls)
        began = watch.clock()
        # Before migrate: whatever QEMU reports from now on is this migration's (a restarted
        # agent reads it back); until then it may be an arrival's or an earlier stream's.
        self.vms.records.begin_outgoing(name, req.migration_id, req.uri)
        out = Outgoing(
            started_at=time.monotonic(),
            uri=req.uri,
            migration_id=req.migration_id,
            downtime_limit_ms=req.params.downtime_limit_ms,
        )
        self._outgoing[name] = out
        ready = asyncio.get_running_loop().create_future()
        out.task = asyncio.create_task(
            self._watch(name, mon, req, out, ready), name=f"migrate-{name}"
        )
        await ready  # the watcher has subscribed and issued migrate (or failed to)
        watch.add("migrate issued", began, watch.clock())
        with watch.step("first figures"):  # its end is the answer's: the caller places on it
            stats = await self.stats(name, 0, None, req.migration_id)
        return stats.model_copy(update={"steps": watch.steps})

    @staticmethod
    def _gives_word(req: OutgoingRequest) -> bool:
        """This source tells the destination to run (it was started paused for this id)."""
        return (
            req.migration_id is not None
            and req.peer is not None
            and req.params.destination_start == "paused"
        )

    async def _watch(
        self,
        name: str,
        mon: Monitor,
        req: OutgoingRequest,
        out: Outgoing,
        ready: asyncio.Future[None],
    ) -> None:
        forwarders: list[LateFrameForwarder] = []
        peer_client: httpx.AsyncClient | None = None
        steering: asyncio.Task[None] | None = None
        try:
            with mon.listen("MIGRATION", "STOP") as listener:
                try:
                    await mon.execute("migrate", {"uri": req.uri})
                except HypervisorError as exc:
                    out.status = "failed"
                    ready.set_exception(exc)
                    return
                ready.set_result(None)
                # Needed only at switchover, so prepared while the first pass runs; the
                # first pass of any real guest takes far longer than this.
                if req.params.forward:
                    forwarders = await self._start_forwarders(name)
                if req.params.steer or self._gives_word(req):
                    peer_client = await self.peers.client(req.peer)
                    if peer_client is None and req.peer is not None:
                        missing = "no client to call the destination at switchover"
                        out.steer_error = missing if req.params.steer else None
                        out.finish_error = missing if self._gives_word(req) else None
                async for event in listener:
                    if event["event"] == "STOP":
                        # Switchover begins: the guest consumes nothing more here.
                        ts = event["timestamp"]
                        assert isinstance(ts, dict)
                        stopped = ts["seconds"] + ts["microseconds"] / 1e6
                        out.stopped_at = time.monotonic()
                        out.events.append(("stopped", out.stopped_at))
                        # The guest is paused for the final copy; QEMU says "active" still
                        # (without pause-before-switchover it never says "device").
                        self._guard(name, mon, out, "stopped")
                        for fw in forwarders:
                            fw.vm_stopped(stopped)
                        if steering is None:
                            steerer = peer_client if req.params.steer else None
                            steering = out.steering = asyncio.create_task(
                                self._steer_peer(name, req, out, steerer, forwarders)
                            )
                        continue
                    data = event["data"]
                    assert isinstance(data, dict)
                    out.status = str(data["status"])
                    out.events.append((out.status, time.monotonic()))
                    out.changed.set()
                    out.changed = asyncio.Event()
                    if out.status.startswith("postcopy"):
                        self.vms.records.went_postcopy(name)
                    self._guard(name, mon, out, out.status)
                    if out.status == "pre-switchover":
                        if req.params.copy_datastore is not None:
                            out.mirror_error = await self.nbd.end_in_sync(name, mon)
                        if out.mirror_error is not None:
                            # The destination would run on disks that lack writes: the
                            # guest resumes here on its own disks instead.
                            log.error("migration of %s cancelled: %s", name, out.mirror_error)
                            await mon.execute("migrate_cancel")
                            continue
                        self._guard(name, mon, out, "mirrors-ended")
                        try:
                            await mon.execute("migrate-continue", {"state": "pre-switchover"})
                        except QmpError as exc:  # the stream failed meanwhile: events tell
                            log.warning("migration of %s not continued: %s", name, exc)
                    word = out.status == "completed" and self._gives_word(req)
                    if word and peer_client is not None and out.finishing is None:
                        out.finishing = asyncio.create_task(
                            self._finish_peer(mon, req, out, peer_client)
                        )
                    if out.status in FINISHED:
                        return
        except HypervisorError as exc:
            log.error("lost the monitor of %s during migration: %s", name, exc)
            out.status = "failed"
        finally:
            out.changed.set()
            if out.guard is not None:
                out.guard.cancel()
            with contextlib.suppress(Exception):
                await self.nbd.after_migration(name, completed=out.status == "completed")
            for call in (steering, out.finishing):
                if call is not None:
                    with contextlib.suppress(Exception):
                        await call
            if peer_client is not None:
                await peer_client.aclose()
            # After success the forwarders keep passing stragglers on for a moment.
            linger = FORWARD_FOR_S + 0.5 if out.status == "completed" else 0.0
            asyncio.get_running_loop().call_later(
                linger, lambda: asyncio.ensure_future(self._close_forwarders(forwarders))
            )

    async def _start_forwarders(self, name: str) -> list[LateFrameForwarder]:
        spec = self.vms.spec(name)
        forwarders = []
        for i, nic in enumerate(spec.nics):
            fw = LateFrameForwarder(
                tap_name(spec, i), nic.bridge, nic.mac, f"{spec.uuid.hex[:8]}{i}"
            )
            try:
                await asyncio.to_thread(fw.start)
                forwarders.append(fw)
            except Exception as exc:  # netlink, tc, sysfs: any of them may fail
                # Without it the migration still works; a late frame may cost a TCP RTO.
                # Never let it end the watch of a running migration (start() cleaned up).
                log.warning("no late-frame forwarding for %s: %s", name, exc)
        return forwarders

    async def _close_forwarders(self, forwarders: list[LateFrameForwarder]) -> None:
        for fw in forwarders:
            try:
                await asyncio.to_thread(fw.close)
            except Exception as exc:  # the next NIC's forwarder must still be closed
                log.warning("closing late-frame forwarding on %s: %s", fw.tap, exc)

    async def _steer_peer(
        self,
        name: str,
        req: OutgoingRequest,
        out: Outgoing,
        peer_client: httpx.AsyncClient | None,
        forwarders: list[LateFrameForwarder],
    ) -> None:
        """Ask the destination to take the VM's traffic now, then replay late frames to it."""
        start = time.monotonic()
        try:
            if peer_client is not None and req.peer is not None:
                macs = [n.mac for n in self.vms.spec(name).nics]
                if macs:
                    try:
                        base = "/v1/peer" if req.peer.url.startswith("https:") else "/v1"
                        resp = await peer_client.post(
                            f"{base}/vms/{req.peer.vm}/steer", json={"mac": macs}
                        )
                        if resp.status_code >= 400:
                            out.steer_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    except httpx.HTTPError as exc:
                        # QEMU's own announce still follows the destination's resume.
                        out.steer_error = str(exc) or type(exc).__name__
            out.steer_ms = (time.monotonic() - start) * 1000
        finally:
            for fw in forwarders:
                fw.release()

    async def _finish_peer(
        self, mon: Monitor, req: OutgoingRequest, out: Outgoing, client: httpx.AsyncClient
    ) -> None:
        """Tell the paused destination to run; a failure is only recorded (the manager gives
        the word too)."""
        assert req.peer is not None and req.migration_id is not None
        out.finish_error = await finish_on_peer(mon, client, req.peer, req.migration_id)
        if out.finish_error is None:
            out.finish_ms = (time.monotonic() - (out.stopped_at or out.started_at)) * 1000

    @staticmethod
    def _guard(name: str, mon: Monitor, out: Outgoing, mark: str) -> None:
        """Where the guest's paused stretch stands after ``mark``: the source's STOP
        (``stopped``) or QEMU's new status. It starts at the STOP or at ``device``, pauses
        while the disks' mirrors end at ``pre-switchover`` (their own limits; the watcher marks
        ``mirrors-ended`` after them), and ends with the stream or in postcopy (``ENDS``);
        the guard runs while it lasts."""
        if out.status in ENDS or mark == "pre-switchover":
            out.stuck_since = None
            return
        if mark not in ("stopped", "device", "mirrors-ended"):
            return  # active, setup...: unchanged (a STOP may have started the stretch)
        if out.stuck_since is None:
            out.stuck_since = time.monotonic()
        if out.guard is None or out.guard.done():
            out.guard = asyncio.create_task(
                guard_switchover(name, mon, out), name=f"switchover-guard-{name}"
            )

    async def stats(
        self, name: str, wait_ms: int, known: str | None, migration: str | None = None
    ) -> MigrationStats:
        """Migration progress; with ``wait_ms``, first wait for a status other than ``known``.

        With ``migration``: QEMU's figures only if its current migration is that one (else
        status ``none``: no such migration here), and an outgoing ``completed`` only with
        QEMU in ``postmigrate`` (``agent.vms.migration_record.outgoing_status``)."""
        mon = self.vms.monitor(name)
        record = self.vms.records.get(name)
        if migration is not None and record.current != migration:
            return MigrationStats(status=QemuMigrationStatus.NONE)
        out = self._outgoing.get(name)
        if out is not None and migration is not None and out.migration_id != migration:
            out = None  # an earlier stream's
        if out is not None and wait_ms > 0 and out.status == known and known not in FINISHED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(out.changed.wait(), wait_ms / 1000)
        stats = MigrationStats.from_qmp(await mon.execute("query-migrate"))
        stats.migration_id = record.current
        if migration is not None and record.outgoing is not None and stats.status == "completed":
            stats.status = QemuMigrationStatus(outgoing_status(stats.status, await mon.status()))
        if out is not None and stats.finished:
            # The switchover call and the word to the destination may still be answering as
            # QEMU completes: their figures belong in the final stats.
            calls = {t for t in (out.steering, out.finishing) if t is not None}
            if calls:
                await asyncio.wait(calls, timeout=STEER_WAIT_S)
        waking = out.restore_increment_at if out is not None else None
        if (
            out is not None
            and waking is not None
            and (stats.throttle_pct >= waking or stats.finished)
        ):
            out.restore_increment_at = None
            if not stats.finished:
                with contextlib.suppress(HypervisorError):
                    await mon.execute(
                        "migrate-set-parameters", {"cpu-throttle-increment": THROTTLE_INCREMENT}
                    )
        incoming = self._incoming_events(name)
        if incoming is not None:
            stats.events = [(status, t * 1000) for status, t in incoming]
        if out is not None:
            stats.steer_ms = out.steer_ms
            stats.steer_error = out.steer_error
            stats.finish_ms = out.finish_ms
            stats.finish_error = out.finish_error
            if out.guard_error is not None:
                stats.error = f"{out.guard_error} ({stats.error or 'no QEMU error yet'})"
            if out.mirror_error is not None:
                stats.error = f"disk copy: {out.mirror_error}"
            stats.started_at_ms = out.started_at * 1000
            stats.events = [(status, t * 1000) for status, t in out.events]
        return stats

    def migrating(self, name: str) -> bool:
        """An outgoing migration of ``name`` has not finished."""
        out = self._outgoing.get(name)
        return out is not None and out.status not in FINISHED

    async def settle_after_restart(self, name: str, mon: Monitor) -> None:
        """At agent start: a source left at pre-switchover (only this agent's watcher lets it
        go on, and it died) is cancelled: the guest resumes here, the manager rolls back. One
        sending its device state is guarded again; one that does not answer while a stream
        of its is recorded holds its big lock in the switchover: its stream is yanked."""
        try:
            migration = await asyncio.wait_for(mon.execute("query-migrate"), SETTLE_ANSWER_S)
        except TimeoutError:
            if self.vms.records.get(name).outgoing is not None:
                log.error("%s does not answer in its switchover: yanking its stream", name)
                await mon.execute("yank", {"instances": [{"type": "migration"}]}, oob=True)
            return
        status = migration.get("status")
        if status == "pre-switchover":
            log.warning("%s was left at pre-switchover: cancelling", name)
            await mon.execute("migrate_cancel")
        elif status == "device":
            limit = (await mon.execute("query-migrate-parameters")).get("downtime-limit", 300)
            rec = self.vms.records.get(name).outgoing
            out = Outgoing(
                started_at=time.monotonic(),
                status="device",
                downtime_limit_ms=int(limit),
                uri=rec.uri if rec is not None else None,
                migration_id=rec.id if rec is not None else None,
            )
            self._outgoing[name] = out
            out.guard = asyncio.create_task(follow_and_guard(name, mon, out))

    async def tune(self, name: str, tune: MigrationTune) -> MigrationStats:
        """Change a running outgoing migration's parameters (the convergence ladder)."""
        out = self._outgoing.get(name)
        if out is None or out.status in FINISHED:
            raise Conflict(f"VM {name} has no outgoing migration to tune", vm=name)
        parameters = tune_parameters(tune)
        if tune.throttle_pct is not None:
            # A throttle already running (the dormant 1 % fired) ignores a new initial value
            # and only steps by the increment: one step to the wanted value, then the usual.
            current = (await self.stats(name, 0, None)).throttle_pct
            if 0 < current < tune.throttle_pct:
                parameters["cpu-throttle-increment"] = tune.throttle_pct - current
                out.restore_increment_at = tune.throttle_pct
        if parameters:
            try:
                await self.vms.monitor(name).execute("migrate-set-parameters", parameters)
            except HypervisorError as exc:
                raise OperationFailed.of(
                    exc, vm=name, what=f"tuning the migration of {name}"
                ) from exc
            if tune.downtime_limit_ms is not None:
                out.downtime_limit_ms = tune.downtime_limit_ms  # the switchover guard's too
        if tune.start_postcopy:
            # Recorded before QEMU is asked: an agent that restarts before its watcher saw
            # the switch must still never resume this copy (it may lack what the destination
            # wrote since). A switch that never happens only makes the record cautious.
            self.vms.records.went_postcopy(name)
            try:
                await self.vms.monitor(name).execute("migrate-start-postcopy")
            except HypervisorError as exc:
                raise OperationFailed.of(
                    exc, vm=name, what=f"switching {name} to postcopy"
                ) from exc
        return await self.stats(name, 0, None)

    async def _pause_postcopy(self, name: str, mon: Monitor) -> str:
        """Source: bring a postcopy stream that still looks alive to ``postcopy-paused``;
        returns the status reached."""
        status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status in ("postcopy-active", "postcopy-recover"):
            with contextlib.suppress(HypervisorError):
                await mon.execute("migrate-pause", oob=True)
        elif status == "postcopy-recover-setup":
            # Not pausable: a reconnection stuck connecting is ended by yanking its channel.
            with contextlib.suppress(HypervisorError):
                await mon.execute("yank", {"instances": [{"type": "migration"}]}, oob=True)
        deadline = time.monotonic() + PAUSE_SETTLE_S
        while status in POSTCOPY_LIVE and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            status = str((await mon.execute("query-migrate")).get("status", "none"))
        return status

    async def reconnect_outgoing(self, name: str, req: PostcopyRecovery) -> MigrationStats:
        """Source: send a paused postcopy stream on, to where the destination listens again."""
        if not req.uri:
            raise Conflict(f"no address to resume the migration of {name} to", vm=name)
        mon = self.vms.monitor(name)
        try:
            status = await self._pause_postcopy(name, mon)
            if status in POSTCOPY_RECOVERING:
                return await self.stats(name, 0, None)  # already reconnecting
            if status != "postcopy-paused":
                raise Conflict(f"the migration of {name} is {status}, not postcopy-paused", vm=name)
            await mon.execute("migrate", {"uri": req.uri, "resume": True})
        except HypervisorError as exc:
            raise OperationFailed.of(
                exc, vm=name, what=f"resuming the postcopy stream of {name}"
            ) from exc
        return await self.stats(name, 0, None)

    def went_postcopy(self, name: str) -> bool:
        """This source's migration entered postcopy: its memory is now partly only on the
        destination, so it is never cancelled or resumed here."""
        out = self._outgoing.get(name)
        return out is not None and any(s.startswith("postcopy") for s, _ in out.events)

    async def cancel(self, name: str, migration: str | None = None) -> MigrationStats:
        """Cancel the outgoing stream; with ``migration``, only that migration's (another's
        is left alone: the answer is the stats for that id, status ``none``)."""
        mon = self.vms.monitor(name)
        if migration is not None:
            issued = self.vms.records.get(name).outgoing
            if issued is None or issued.id != migration:
                return await self.stats(name, 0, None, migration)
        status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status.startswith("postcopy") or self.went_postcopy(name):
            raise InPostcopy(
                f"VM {name} is in postcopy ({status}): the destination runs it; "
                "a cancel would lose the pages not yet sent",
                vm=name,
            )
        # QEMU 10.0.2 aborts (error_setv's assertion, after "failed to save SaveStateEntry
        # ... ram: -5") when a cancel breaks the stream while it sets the RAM up: the guest
        # dies with it (seen in a CI run). Setup ends in moments on a live link, so the cancel
        # waits for it; on a link that never lets it end, it goes ahead after the wait.
        deadline = time.monotonic() + SETUP_WAIT_S
        while status == "setup" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status.startswith("postcopy") or status in ("completed", "failed", "cancelled"):
            return await self.stats(name, 0, None, migration)  # nothing to cancel any more
        await mon.execute("migrate_cancel")
        deadline = time.monotonic() + CANCEL_SETTLE_S
        stats = await self.stats(name, 0, None, migration)
        while stats.status == "cancelling" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stats = await self.stats(name, 0, None, migration)
        if stats.status == "cancelling":
            # migrate_cancel shuts the main stream down, but multifd threads blocked sending
            # into a dead link stay blocked (until TCP gives up, ~15 min): yank closes every
            # channel of the migration at once, which is what QEMU provides it for.
            log.warning("migration of %s still cancelling: yanking its channels", name)
            with contextlib.suppress(HypervisorError):
                await mon.execute("yank", {"instances": [{"type": "migration"}]})
            await asyncio.sleep(0.2)
            stats = await self.stats(name, 0, None, migration)
        out = self._outgoing.get(name)
        if stats.status == "cancelling" and out is not None and out.uri:
            # A channel still in its TLS handshake is not among the yanked ones (QEMU waits
            # for it to connect before it can be closed): the kernel ends its socket instead.
            await asyncio.to_thread(destroy_sockets_to, out.uri)
            await asyncio.sleep(0.2)
            stats = await self.stats(name, 0, None, migration)
        return stats

    def forget(self, name: str) -> None:
        """The VM is gone from this host (released or deleted): so is its stream's view."""
        out = self._outgoing.pop(name, None)
        if out is not None and out.guard is not None:
            out.guard.cancel()
