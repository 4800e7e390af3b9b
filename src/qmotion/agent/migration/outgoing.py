"""The source's side of a live migration (libvirt's Src steps): send the VM, follow the stream,
steer the network at switchover; tune, cancel, release or resume it; reconnect a postcopy stream.

The manager drives the sequence; the agent does what must be fast or local: it watches QMP
events, and at switchover (``pause-before-switchover``) it calls the destination agent directly
to steer the network, then lets QEMU continue, so the pause costs one LAN round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import Conflict, InPostcopy, MigratedAway, OperationFailed
from qmotion.agent.migration.params import (
    PAUSE_SETTLE_S,
    require_tls,
    stream_capabilities,
    stream_parameters,
    tls_parameters,
    tune_parameters,
)
from qmotion.agent.migration.peer import PeerConnector
from qmotion.agent.network.forwarder import FORWARD_FOR_S, LateFrameForwarder
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.migration import MigrationStats, MigrationTune, OutgoingRequest, PostcopyRecovery
from qmotion.hypervisor import process
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import tap_name
from qmotion.migration.convergence import THROTTLE_INCREMENT

log = logging.getLogger(__name__)
FINISHED = ("completed", "failed", "cancelled")
POSTCOPY_RECOVERING = ("postcopy-recover-setup", "postcopy-recover")
POSTCOPY_LIVE = ("postcopy-active", *POSTCOPY_RECOVERING)
# QEMU migration states in which no migration is under way (a source may be resumed).
IDLE_MIGRATION = ("none", "completed", "failed", "cancelled")
STEER_WAIT_S = 2.0
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


def _destroy_sockets_to(uri: str) -> None:
    """End every TCP socket of this host to the stream's destination (``ss -K``; the port is
    the destination QEMU's, so nothing else uses it)."""
    kind, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        return
    log.warning("ending the sockets of a stuck migration to %s", rest)
    try:
        subprocess.run(
            ["ss", "-K", "dst", host.strip("[]"), "dport", "=", port],
            capture_output=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not end the sockets to %s: %s", rest, exc)


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
        await mon.execute(
            "migrate-set-capabilities",
            {"capabilities": stream_capabilities(req.params, source=True)},
        )
        try:
            tls = await tls_parameters(mon, self.tls, req.params, "client")
        except HypervisorError as exc:
            raise OperationFailed.of(exc, vm=name, what=f"setting up TLS for {name}") from exc
        await mon.execute("migrate-set-parameters", stream_parameters(req.params) | tls)
        out = Outgoing(started_at=time.monotonic(), uri=req.uri)
        self._outgoing[name] = out
        ready = asyncio.get_running_loop().create_future()
        out.task = asyncio.create_task(
            self._watch(name, mon, req, out, ready), name=f"migrate-{name}"
        )
        await ready  # the watcher has subscribed and issued migrate (or failed to)
        return await self.stats(name, 0, None)

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
                if req.params.steer:
                    peer_client = await self.peers.client(req.peer)
                    if peer_client is None and req.peer is not None:
                        out.steer_error = "no client to call the destination at switchover"
                async for event in listener:
                    if event["event"] == "STOP":
                        # Switchover begins: the guest consumes nothing more here.
                        ts = event["timestamp"]
                        assert isinstance(ts, dict)
                        stopped = ts["seconds"] + ts["microseconds"] / 1e6
                        out.events.append(("stopped", time.monotonic()))
                        for fw in forwarders:
                            fw.vm_stopped(stopped)
                        if steering is None:
                            steering = out.steering = asyncio.create_task(
                                self._steer_peer(name, req, out, peer_client, forwarders)
                            )
                        continue
                    data = event["data"]
                    assert isinstance(data, dict)
                    out.status = str(data["status"])
                    out.events.append((out.status, time.monotonic()))
                    out.changed.set()
                    out.changed = asyncio.Event()
                    if out.status == "pre-switchover":
                        if req.params.copy_datastore is not None:
                            out.mirror_error = await self.nbd.end_in_sync(name, mon)
                        if out.mirror_error is not None:
                            # The destination would run on disks that lack writes: the
                            # guest resumes here on its own disks instead.
                            log.error("migration of %s cancelled: %s", name, out.mirror_error)
                            await mon.execute("migrate_cancel")
                            continue
                        await mon.execute("migrate-continue", {"state": "pre-switchover"})
                    if out.status in FINISHED:
                        return
        except HypervisorError as exc:
            log.error("lost the monitor of %s during migration: %s", name, exc)
            out.status = "failed"
        finally:
            out.changed.set()
            with contextlib.suppress(Exception):
                await self.nbd.after_migration(name, completed=out.status == "completed")
            if steering is not None:
                with contextlib.suppress(Exception):
                    await steering
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

    async def stats(self, name: str, wait_ms: int, known: str | None) -> MigrationStats:
        """Migration progress; with ``wait_ms``, first wait for a status other than ``known``."""
        mon = self.vms.monitor(name)
        out = self._outgoing.get(name)
        if out is not None and wait_ms > 0 and out.status == known and known not in FINISHED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(out.changed.wait(), wait_ms / 1000)
        stats = MigrationStats.from_qmp(await mon.execute("query-migrate"))
        if out is not None and out.steering is not None and stats.finished:
            # The switchover call may still be answering as QEMU completes: its figures
            # belong in the final stats.
            await asyncio.wait({out.steering}, timeout=STEER_WAIT_S)
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
        go on, and it died) is cancelled: the guest resumes here, the manager rolls back."""
        migration = await mon.execute("query-migrate")
        if migration.get("status") == "pre-switchover":
            log.warning("%s was left at pre-switchover: cancelling", name)
            await mon.execute("migrate_cancel")

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
        if tune.start_postcopy:
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

    def _went_postcopy(self, name: str) -> bool:
        """This source's migration entered postcopy: its memory is now partly only on the
        destination, so it is never cancelled or resumed here."""
        out = self._outgoing.get(name)
        return out is not None and any(s.startswith("postcopy") for s, _ in out.events)

    async def cancel(self, name: str) -> MigrationStats:
        mon = self.vms.monitor(name)
        status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status.startswith("postcopy") or self._went_postcopy(name):
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
            return await self.stats(name, 0, None)  # nothing to cancel any more
        await mon.execute("migrate_cancel")
        deadline = time.monotonic() + CANCEL_SETTLE_S
        stats = await self.stats(name, 0, None)
        while stats.status == "cancelling" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stats = await self.stats(name, 0, None)
        if stats.status == "cancelling":
            # migrate_cancel shuts the main stream down, but multifd threads blocked sending
            # into a dead link stay blocked (until TCP gives up, ~15 min): yank closes every
            # channel of the migration at once, which is what QEMU provides it for.
            log.warning("migration of %s still cancelling: yanking its channels", name)
            with contextlib.suppress(HypervisorError):
                await mon.execute("yank", {"instances": [{"type": "migration"}]})
            await asyncio.sleep(0.2)
            stats = await self.stats(name, 0, None)
        out = self._outgoing.get(name)
        if stats.status == "cancelling" and out is not None and out.uri:
            # A channel still in its TLS handshake is not among the yanked ones (QEMU waits
            # for it to connect before it can be closed): the kernel ends its socket instead.
            await asyncio.to_thread(_destroy_sockets_to, out.uri)
            await asyncio.sleep(0.2)
            stats = await self.stats(name, 0, None)
        return stats

    async def release(self, name: str) -> None:
        """After a completed migration, end the source's QEMU and forget the VM here.

        Refused unless QEMU says the VM moved away (postmigrate): never end the only copy.
        """
        async with self.vms.locked(name) as spec:
            mon = self.vms.monitor(name)
            migration = str((await mon.execute("query-migrate")).get("status", "none"))
            if migration.startswith("postcopy"):
                raise InPostcopy(
                    f"VM {name} is in postcopy ({migration}): this QEMU still holds pages "
                    "the destination needs; refusing to release it",
                    vm=name,
                )
            status = await mon.status()
            if status != "postmigrate":
                raise Conflict(
                    f"VM {name} is {status} here, not migrated away; refusing to release it",
                    vm=name,
                )
            copied = self.nbd.copied_sources(name)
            rt = self.vms.runtime(name)
            with contextlib.suppress(HypervisorError):
                await mon.execute("quit")
            if rt is not None:
                await asyncio.to_thread(process.wait_gone, rt.pid, spec.uuid, 5.0)
                await asyncio.to_thread(process.kill, rt.pid, spec.uuid)
            # The destination runs on its copies (the manager saw it): these are the old
            # ones. Removed while the definition still names them: a crash now leaves the
            # VM defined here, not files nobody knows of.
            self.incoming_disks.remove(copied)
        self._outgoing.pop(name, None)
        await self.vms.delete(name, force=True)

    async def resume(self, name: str, after_failed_switchover: bool = False) -> str:
        """Resume a source left paused by a failed migration; returns QEMU's status.

        A source whose migration completed is resumed only when the manager says the
        destination was removed (``after_failed_switchover``): otherwise two copies would run.
        """
        mon = self.vms.monitor(name)
        migration = await mon.execute("query-migrate")
        qemu_migration = migration.get("status", "none")
        if qemu_migration.startswith("postcopy"):
            raise InPostcopy(
                f"VM {name} is in postcopy ({qemu_migration}): the destination runs it and "
                "this copy lacks what it has written; it is never resumed here",
                vm=name,
            )
        if self._went_postcopy(name):
            raise MigratedAway(
                f"VM {name} migrated away in postcopy: the destination has written to memory "
                "this copy does not have; it is never resumed here",
                vm=name,
            )
        if qemu_migration == "completed" and not after_failed_switchover:
            raise MigratedAway(
                f"VM {name} completed its migration away; it runs elsewhere now", vm=name
            )
        if qemu_migration not in IDLE_MIGRATION:
            # Resuming mid-migration could race the switchover into two running copies.
            raise Conflict(
                f"VM {name} is still migrating ({qemu_migration}); cancel it first", vm=name
            )
        status = await mon.status()
        if status in ("paused", "postmigrate", "finish-migrate"):
            await mon.execute("cont")
            status = await mon.status()
        # It runs here on its own disks: a copy made for a migration that did not happen is
        # void (and its record must not lead a later release to the files).
        await self.nbd.void(name)
        return status
