"""The agent's half of a live migration: incoming on the destination, outgoing on the source.

The manager drives the sequence; the agent does what must be fast or local: it watches QMP
events, and at switchover (``pause-before-switchover``) it calls the destination agent directly
to steer the network, then lets QEMU continue, so the pause costs one LAN round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from qmotion.agent.disks.nbd import IncomingDisks, NbdMirrors
from qmotion.agent.errors import AgentError, Conflict, InPostcopy, MigratedAway, OperationFailed
from qmotion.agent.network.forwarder import FORWARD_FOR_S, LateFrameForwarder
from qmotion.agent.network.steer import Steerer
from qmotion.agent.network.tapwatch import TapWatch
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.migration import (
    UNLIMITED_BANDWIDTH,
    DirtyRateReport,
    DirtyRateSample,
    IncomingRequest,
    IncomingResponse,
    MigrationParams,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PeerRef,
    PostcopyRecovery,
    SteerRequest,
)
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor import process
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import tap_name
from qmotion.migration.convergence import DORMANT_THROTTLE, MAX_THROTTLE, THROTTLE_INCREMENT

log = logging.getLogger(__name__)
FINISHED = ("completed", "failed", "cancelled")
POSTCOPY_RECOVERING = ("postcopy-recover-setup", "postcopy-recover")
POSTCOPY_LIVE = ("postcopy-active", *POSTCOPY_RECOVERING)
PAUSE_SETTLE_S = 5.0
# QEMU migration states in which no migration is under way (a source may be resumed).
IDLE_MIGRATION = ("none", "completed", "failed", "cancelled")
T = TypeVar("T")
STEER_WAIT_S = 2.0
CANCEL_SETTLE_S = 1.0  # a cancel that has not settled by then is stuck on a dead link
SETUP_WAIT_S = 10.0  # a cancel waits this long for QEMU to finish setting the stream up
EXPORTS_END_AFTER_S = 2.0  # shared-nothing: the destination's NBD exports, after its resume


@dataclass
class Outgoing:
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


def _capabilities(params: MigrationParams, *, source: bool) -> list[dict[str, Any]]:
    caps = {
        "events": True,
        "multifd": params.multifd_channels > 0,
        "pause-before-switchover": source and params.pause_before_switchover,
        # QEMU fixes capabilities when the stream starts: what the ladder may need later is
        # switched on now (auto-converge dormant, see qmotion.migration.convergence).
        "auto-converge": source and params.auto_converge,
        "xbzrle": params.xbzrle_cache_bytes > 0,
        # Both ends: the destination registers its memory with userfaultfd for it.
        "postcopy-ram": params.postcopy,
    }
    return [{"capability": k, "state": v} for k, v in caps.items()]


def _parameters(params: MigrationParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max-bandwidth": params.max_bandwidth,
        "downtime-limit": params.downtime_limit_ms,
    }
    if params.multifd_channels > 0:
        out["multifd-channels"] = params.multifd_channels
    if params.postcopy:
        # QEMU's postcopy has its own cap, unlimited (0) by default: the operator's holds too.
        # Always set: a QEMU that arrived by a capped migration still has that one's.
        capped = params.max_bandwidth < UNLIMITED_BANDWIDTH
        out["max-postcopy-bandwidth"] = params.max_bandwidth if capped else 0
    if params.auto_converge:
        # Dormant: QEMU may still trigger on its own when the guest outruns the link, so
        # the ceiling holds it at 1 % until the ladder wakes it.
        initial, increment, threshold, ceiling = DORMANT_THROTTLE
        if params.throttle_initial_pct:
            increment = params.throttle_increment_pct or THROTTLE_INCREMENT
            initial, threshold, ceiling = params.throttle_initial_pct, 50, MAX_THROTTLE
        out |= {
            "cpu-throttle-initial": initial,
            "cpu-throttle-increment": increment,
            "throttle-trigger-threshold": threshold,
            "max-cpu-throttle": ceiling,
        }
    if params.xbzrle_cache_bytes > 0:
        # QEMU takes only a power of two no smaller than a page (migrate_params_check).
        out["xbzrle-cache-size"] = max(1 << (params.xbzrle_cache_bytes.bit_length() - 1), 4096)
    return out


def _tune_parameters(tune: MigrationTune) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tune.downtime_limit_ms is not None:
        out["downtime-limit"] = tune.downtime_limit_ms
    if tune.throttle_pct is not None:
        # Awake: QEMU starts here (or, when the dormant 1 % already triggered, adds the
        # increment to it) and steps again after every two syncs in which the guest dirtied
        # more than half of what was sent.
        out |= {
            "cpu-throttle-initial": tune.throttle_pct,
            "cpu-throttle-increment": THROTTLE_INCREMENT,
            "throttle-trigger-threshold": 50,
            "max-cpu-throttle": MAX_THROTTLE,
        }
    return out


SAMPLE_PAGES = 2048  # per GiB: QEMU's 512 leaves a 100 MiB/s sweep with +-15 % noise


def _rss_bytes(pid: int) -> int:
    """QEMU's resident memory: an upper bound on the guest RAM a first pass sends."""
    # Huge pages are not in VmRSS: a guest backed by them shows only QEMU's own memory there.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.partition(":")[::2] for line in status.splitlines())
        return sum(
            int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "HugetlbPages") if k in fields
        )
    except (OSError, ValueError, IndexError):
        return 1 << 62


def _qmp_failed(what: str, vm: str, exc: HypervisorError) -> OperationFailed:
    """QEMU refused: the agent's error body with QMP's error class, not a bare 500."""
    return OperationFailed(
        f"{what} failed: {exc}", vm=vm, qmp_class=getattr(exc, "qmp_class", None)
    )


NONZERO_SAMPLES = 256
NONZERO_BUDGET_S = 0.25
LOW_RAM_END = 2 << 30  # RAM on every pc and q35 layout (q35 puts its PCI hole at 2 GiB)


async def _nonzero_share(mon: Monitor, memory: int) -> float | None:
    """The share of guest pages whose first 32 bytes are not all zero (QEMU sends zero pages
    as a flag), from random pages read with HMP ``xp``; None if it cannot be read."""
    span = min(memory, LOW_RAM_END) // 4096
    if span < 256:
        return None
    rng = random.Random(span)
    deadline = time.monotonic() + NONZERO_BUDGET_S
    seen = nonzero = 0
    while seen < NONZERO_SAMPLES and time.monotonic() < deadline:
        addr = rng.randrange(256, span) * 4096  # above the first MiB (BIOS, VGA)
        try:
            out = await mon.execute("human-monitor-command", {"command-line": f"xp /4gx {addr}"})
        except HypervisorError:
            return None
        words = [w for line in str(out).splitlines() for w in line.split(":", 1)[-1].split()]
        seen += 1
        nonzero += any(int(w, 16) for w in words if w.startswith("0x"))
    return nonzero / seen if seen >= 32 else None


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


class Migrations:
    def __init__(self, vms: VmManager, tls: TlsStore | None = None) -> None:
        self.vms = vms
        self.tls = tls
        self.nbd = NbdMirrors(vms, tls)
        self.incoming_disks = IncomingDisks(vms)
        self._ending: set[asyncio.Future[None]] = set()
        self._outgoing: dict[str, Outgoing] = {}
        self._steerers: dict[str, asyncio.Future[Steerer]] = {}
        self._incoming_watch: dict[str, asyncio.Task[None]] = {}
        self._incoming_events: dict[str, list[tuple[str, float]]] = {}
        self._incoming_uri: dict[str, str] = {}  # where the stream came in: a recovery's too
        self._tapwatch: dict[str, TapWatch] = {}
        self._dirty_locks: dict[str, asyncio.Lock] = {}
        # pyroute2's sync API runs its own event loop: it must stay off the agent's loop
        # thread, and a Steerer is used from the thread that built it.
        self._netlink = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer")

    async def _in_netlink_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn)

    # ------------------------------------------------------------------ destination

    async def incoming(self, req: IncomingRequest) -> IncomingResponse:
        """Define the VM here and start QEMU waiting for the stream; returns where to send it."""
        spec = req.spec
        address = self.vms.config.address
        if not address:
            raise OperationFailed("this agent has no address to receive migrations on")
        self._require_tls(req.params)
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
            spec, made = await self.incoming_disks.create(spec, req.copy_disks)
        try:
            await self.vms.define(spec)
        except BaseException:
            self.incoming_disks.remove(made)
            raise
        nbd = None
        try:
            if made:
                self.incoming_disks.own(spec.name, made)
            await self.vms.start(spec.name, incoming="defer")
            mon = self.vms.monitor(spec.name)
            await mon.execute(
                "migrate-set-capabilities",
                {"capabilities": _capabilities(req.params, source=False)},
            )
            await mon.execute(
                "migrate-set-parameters",
                _parameters(req.params) | await self._tls_parameters(mon, req.params, "server"),
            )
            events: list[tuple[str, float]] = []
            self._incoming_events[spec.name] = events
            self._incoming_watch[spec.name] = asyncio.create_task(
                self._watch_incoming(spec.name, mon, events), name=f"incoming-{spec.name}"
            )
            # The address the manager chose (the first the source reaches); else the
            # preferred one. Never all interfaces: whoever connects first would be the stream.
            addresses = [*self.vms.config.migration_addresses, address]
            wanted = str(req.address) if req.address is not None else None
            listen = wanted if wanted in addresses else addresses[0]
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
                )
        except (HypervisorError, KeyError, IndexError, AgentError, OSError) as exc:
            await self.vms.delete(spec.name, force=True)
            raise OperationFailed(
                f"preparing incoming migration of {spec.name} failed: {exc}; "
                "the destination was removed",
                vm=spec.name,
                qmp_class=getattr(exc, "qmp_class", None),
            ) from exc
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
        return IncomingResponse(uri=f"tcp:{listen}:{port}", port=port, addresses=[listen], nbd=nbd)

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

    async def settle_after_restart(self) -> None:
        """At agent start. A VM that resumed here while the agent was away owns its disks.
        A source left at pre-switchover (only this agent's watcher lets it go on, and it died)
        is cancelled: the guest resumes here, the manager rolls back."""
        for name in self.vms.names():
            with contextlib.suppress(AgentError, HypervisorError):
                mon = self.vms.monitor(name)
                if self.vms.incoming_disks(name) and await mon.status() == "running":
                    await self.incoming_disks.end(name)
                migration = await mon.execute("query-migrate")
                if migration.get("status") == "pre-switchover":
                    log.warning("%s was left at pre-switchover: cancelling", name)
                    await mon.execute("migrate_cancel")

    async def keep_disks(self, name: str) -> None:
        """The manager saw the VM run here: the disks its copy made are simply its own."""
        self.vms.spec(name)
        await self.incoming_disks.end(name)

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
                    events.append((str(data["status"]), time.monotonic()))
                    if data["status"] in ("failed", "cancelled"):
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

    # ------------------------------------------------------------------ source

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
        self._require_tls(req.params)
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
            "migrate-set-capabilities", {"capabilities": _capabilities(req.params, source=True)}
        )
        try:
            tls = await self._tls_parameters(mon, req.params, "client")
        except HypervisorError as exc:
            raise _qmp_failed(f"setting up TLS for {name}", name, exc) from exc
        await mon.execute("migrate-set-parameters", _parameters(req.params) | tls)
        out = Outgoing(started_at=time.monotonic(), uri=req.uri)
        self._outgoing[name] = out
        ready = asyncio.get_running_loop().create_future()
        out.task = asyncio.create_task(
            self._watch(name, mon, req, out, ready), name=f"migrate-{name}"
        )
        await ready  # the watcher has subscribed and issued migrate (or failed to)
        return await self.stats(name, 0, None)

    def _require_tls(self, params: MigrationParams) -> TlsStore | None:
        """Refused before anything starts: a TLS stream needs this host's certificate."""
        if not params.tls:
            return None
        if self.tls is None or not self.tls.ready:
            raise Conflict(
                "this host has no certificate from the cluster CA for a TLS migration; "
                "register it with the manager again"
            )
        return self.tls

    async def _tls_parameters(
        self, mon: Monitor, params: MigrationParams, endpoint: str
    ) -> dict[str, Any]:
        """QEMU's x509 credentials for this end of the stream (mutual: both verify), or
        none; set either way, since a QEMU that migrated before keeps what it was told."""
        if not params.tls:
            return {"tls-creds": "", "tls-hostname": ""}
        tls = self._require_tls(params)
        assert tls is not None
        creds = f"qm-tls-{endpoint}"
        with contextlib.suppress(HypervisorError):
            await mon.execute("object-del", {"id": creds})  # from an earlier migration
        await mon.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": creds,
                "endpoint": endpoint,
                "dir": str(tls.qemu_dir),
                "verify-peer": True,
            },
        )
        out: dict[str, Any] = {"tls-creds": creds}
        if endpoint == "client":
            # The destination's name (in its certificate), whichever address carries it.
            out["tls-hostname"] = params.tls_hostname or ""
        return out

    async def _peer_client(self, peer: PeerRef | None) -> httpx.AsyncClient | None:
        if peer is None:
            return None
        if peer.url.startswith("https:"):
            if self.tls is None or not self.tls.ready:
                log.warning("no certificate to call the destination at switchover with")
                return None
            try:
                ctx = await asyncio.to_thread(self.tls.client_context)
            except (ssl.SSLError, OSError) as exc:
                # The switchover still happens; QEMU's announce then steers the network.
                log.error("no TLS client context for the switchover call: %s", exc)
                return None
            client = httpx.AsyncClient(base_url=peer.url, verify=ctx, timeout=2.0)
        else:
            client = httpx.AsyncClient(
                base_url=peer.url, headers={"Authorization": f"Bearer {peer.token}"}, timeout=2.0
            )
        # Open the connection now so the switchover pays no TCP handshake.
        with contextlib.suppress(httpx.HTTPError):
            await client.get("/healthz")
        return client

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
                    peer_client = await self._peer_client(req.peer)
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
        incoming = self._incoming_events.get(name)
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

    async def sample_dirty_rate(self, name: str, seconds: float) -> float | None:
        """One page-sampling measurement (MiB/s) for DRS, unless a migration of ``name`` is
        under way (checked again once the VM's turn comes): None then."""
        lock = self._dirty_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self.migrating(name):
                return None
            try:
                sample = await self._one_sample(name, self.vms.monitor(name), seconds)
            except HypervisorError as exc:
                raise _qmp_failed(f"measuring the dirty rate of {name}", name, exc) from exc
        return sample.dirtied_bytes / sample.seconds / (1 << 20)

    async def dirty_rate(self, name: str, seconds: list[float]) -> DirtyRateReport:
        # QEMU runs one measurement at a time and keeps one result: callers take turns.
        lock = self._dirty_locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                return await self._dirty_rate(name, seconds)
            except HypervisorError as exc:
                raise _qmp_failed(f"measuring the dirty rate of {name}", name, exc) from exc

    async def _dirty_rate(self, name: str, seconds: list[float]) -> DirtyRateReport:
        """QMP calc-dirty-rate (page sampling) once per length in ``seconds``, in order.

        Two lengths tell a hot set (found dirty in the short sample already, no more in the
        long one) from a sweep over new pages (dirty bytes growing with the length).
        """
        mon = self.vms.monitor(name)
        spec = self.vms.spec(name)
        memory = spec.memory << 20
        rt = self.vms.runtime(name)
        resident = _rss_bytes(rt.pid) if rt is not None else memory
        share: asyncio.Future[float | None] | None = None
        if rt is not None and rt.memory_backing != "anonymous":
            # A huge-page pool is resident in full from the start: what the first pass will
            # send is the share of pages that are not zero, read while QEMU samples (QEMU's
            # calc-dirty-rate runs in its own thread; the monitor is free meanwhile).
            share = asyncio.ensure_future(_nonzero_share(mon, memory))
        samples = []
        try:
            for length in seconds:
                samples.append(await self._one_sample(name, mon, length))
        finally:
            got = await share if share is not None else None
        if got is not None:
            resident = int(memory * got)
        return DirtyRateReport(
            samples=samples, memory_bytes=memory, resident_bytes=min(resident, memory)
        )

    async def _one_sample(self, name: str, mon: Monitor, length: float) -> DirtyRateSample:
        ms = max(int(length * 1000), 100)
        await mon.execute(
            "calc-dirty-rate",
            {"calc-time": ms, "calc-time-unit": "millisecond", "sample-pages": SAMPLE_PAGES},
        )
        deadline = time.monotonic() + ms / 1000 + 10
        await asyncio.sleep(ms / 1000)
        while True:
            info = await mon.execute("query-dirty-rate")
            if info.get("status") == "measured":
                break
            if time.monotonic() > deadline:
                raise OperationFailed(f"calc-dirty-rate of {name} did not finish", vm=name)
            await asyncio.sleep(0.02)
        # QEMU reports MiB/s over the sampled time (its "MB" is 2^20 bytes).
        rate = float(info.get("dirty-rate", 0)) * (1 << 20)
        return DirtyRateSample(seconds=ms / 1000, dirtied_bytes=int(rate * ms / 1000))

    async def tune(self, name: str, tune: MigrationTune) -> MigrationStats:
        """Change a running outgoing migration's parameters (the convergence ladder)."""
        out = self._outgoing.get(name)
        if out is None or out.status in FINISHED:
            raise Conflict(f"VM {name} has no outgoing migration to tune", vm=name)
        parameters = _tune_parameters(tune)
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
                raise _qmp_failed(f"tuning the migration of {name}", name, exc) from exc
        if tune.start_postcopy:
            try:
                await self.vms.monitor(name).execute("migrate-start-postcopy")
            except HypervisorError as exc:
                raise _qmp_failed(f"switching {name} to postcopy", name, exc) from exc
        return await self.stats(name, 0, None)

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
                    raise _qmp_failed(
                        f"recovering the incoming migration of {name}", name, exc
                    ) from exc
            await asyncio.sleep(0.1)

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

    async def resume_outgoing(self, name: str, req: PostcopyRecovery) -> MigrationStats:
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
            raise _qmp_failed(f"resuming the postcopy stream of {name}", name, exc) from exc
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

    async def announce(self, name: str) -> None:
        """QEMU's own announce (RARP from every NIC), for a VM running here."""
        mon = self.vms.monitor(name)
        await mon.execute(
            "announce-self",
            {
                "initial": 50,
                "max": 550,
                "rounds": 5,
                "step": 100,
            },
        )
