"""The migration engine's port in the manager: each action done through the two agents."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address
from typing import TypeVar

from qmotion.api.migration import (
    UNLIMITED_BANDWIDTH,
    FlightSample,
    IncomingRequest,
    Leftover,
    MigrationParams,
    MigrationPrediction,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PeerRef,
    PostcopyRecovery,
    QemuMigrationStatus,
)
from qmotion.api.storage import (
    CopyDisk,
    DiskCopyPlan,
    DiskUsage,
    MirrorStatus,
    NbdMirrorRequest,
    NbdTargets,
)
from qmotion.api.vm import VmSpec, VmState
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError, NotFound
from qmotion.migration.convergence import (
    DirtyMeasure,
    Ladder,
    Limits,
    PathMeasure,
    Plan,
    Sample,
    plan,
)
from qmotion.migration.errors import InPostcopy, Refused, StepError, SwitchedOver
from qmotion.migration.params import apply_plan
from qmotion.migration.prechecks import PrecheckInput, VmView, copied_disks, precheck
from qmotion.server.db import Database, Host
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.measure import history_bandwidth, measure, route, streams_of

T = TypeVar("T")
PROGRESS_WAIT_MS = 500
VERIFY_TIMEOUT_S = 30.0
# Longer than the source agent may hold the guest at pre-switchover ending the disk mirrors.
SWITCHOVER_WAIT_S = 20.0
# A source at pre-switchover this long has lost the watcher that lets it go on (its agent
# restarted or died): the guest is paused there, so the migration is abandoned.
PRE_SWITCHOVER_STUCK_S = 30.0
SWITCHING = frozenset({QemuMigrationStatus.DEVICE, QemuMigrationStatus.PRE_SWITCHOVER})
MAX_SAMPLES = 600  # flight-recorder samples kept per migration
STALL_TIMEOUT_S = 30.0  # an active migration that moves no data for this long is abandoned
# Where bytes must keep moving: a stream set up over a dead link (a TLS handshake that never
# completes) stays in setup as surely as a copy stalls in active.
MOVING = frozenset({QemuMigrationStatus.SETUP, QemuMigrationStatus.ACTIVE})
# In postcopy the destination's vCPUs wait on pages that do not come: a stream that moves
# nothing for this long is paused and resumed (a dead link is noticed by TCP only in minutes).
POSTCOPY_STALL_S = 5.0
POSTCOPY_RETRY_S = 2.0  # between attempts to resume a broken postcopy stream
POSTCOPY_RECOVER_S = 20.0  # a reconnection that has not completed by then is retried
POSTCOPY = frozenset(
    {
        QemuMigrationStatus.POSTCOPY_DEVICE,
        QemuMigrationStatus.POSTCOPY_ACTIVE,
        QemuMigrationStatus.POSTCOPY_PAUSED,
        QemuMigrationStatus.POSTCOPY_RECOVER_SETUP,
        QemuMigrationStatus.POSTCOPY_RECOVER,
    }
)
# QEMU's migrate_cancel shuts the stream's socket down, so a cancel settles at once; a source
# that has not settled after this long is reported, and its destination kept.
SETTLE_TIMEOUT_S = 60.0
RECANCEL_S = 3.0
IDLE = frozenset(
    {QemuMigrationStatus.NONE, QemuMigrationStatus.FAILED, QemuMigrationStatus.CANCELLED}
)  # no migration under way on the source
MIGRATED_AWAY = "migrated_away"  # the agent's code for "this VM completed a migration away"
IN_POSTCOPY = "in_postcopy"  # the agent's code for "this source is in postcopy, not resumed"
MIRROR_POLL_S = 0.5
MIRROR_STALL_S = 60.0  # a disk copy that gains nothing this long is abandoned


def limits_of(params: MigrationParams) -> Limits:
    """The operator's knobs, as the task carries them."""
    capped = params.max_bandwidth < UNLIMITED_BANDWIDTH
    return Limits(
        max_downtime_ms=params.max_downtime_ms,
        timeout_s=params.timeout_s,
        bandwidth_bps=params.max_bandwidth if capped else None,
        allow_postcopy=params.postcopy,
    )


def copy_plan(
    spec: VmSpec, params: MigrationParams, not_shared: frozenset[str], usage: list[DiskUsage]
) -> DiskCopyPlan:
    """The disks a shared-nothing migration copies and their sizes; ValueError when the
    source cannot say how large one is."""
    assert params.copy_datastore is not None
    sizes = {u.index: u for u in usage}
    disks = []
    for i in copied_disks(
        tuple(d.datastore for d in spec.disks), params.copy_datastore, not_shared
    ):
        u = sizes.get(i)
        if u is None or not u.virtual_size:
            raise ValueError(f"the size of disk {i} of {spec.name} is unknown")
        disks.append(
            CopyDisk(index=i, virtual_size=u.virtual_size, allocated_bytes=u.allocated_bytes or 0)
        )
    return DiskCopyPlan(datastore=params.copy_datastore, format=params.copy_format, disks=disks)


def vm_view(spec: VmSpec, host: str, state: str, migrating: bool) -> VmView:
    return VmView(
        name=spec.name,
        host=host,
        state=state,
        memory_mib=spec.memory,
        cpu_model=spec.cpu_model,
        machine=spec.machine,
        bridges=tuple(n.bridge for n in spec.nics),
        datastores=tuple(d.datastore for d in spec.disks),
        migrating=migrating,
    )


class AgentMigrationPort:
    """One migration of ``vm`` from ``source`` to ``destination``."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        vm: str,
        source: str,
        destination: str,
        params: MigrationParams,
    ) -> None:
        self.db, self.inventory = db, inventory
        self.vm, self.source, self.destination, self.params = vm, source, destination, params
        with db.session() as s:
            row = inventory.vm_by_name(s, vm)
            self.spec = VmSpec.model_validate(row.spec)
            self._src = self.host_copy(inventory.host_by_name(s, source))
            self._dst = self.host_copy(inventory.host_by_name(s, destination))
        self.migrate_issued_at: float | None = None
        self.last_stats: MigrationStats | None = None
        self.destination_events: list[tuple[str, float]] = []
        self.leftovers: list[Leftover] = []
        self.warnings: list[str] = []
        self.prediction: MigrationPrediction | None = None
        self.ladder: Ladder | None = None
        self.samples: list[FlightSample] = []
        self._planning: asyncio.Future[None] | None = None
        self.reach: PathProbe | None = None
        self.migration_address: str | None = None
        self.throttled_s = 0.0
        self.postcopy_requested = False  # from then on the destination may run the VM
        self.stream_uri: str | None = None  # where the destination listens (persisted)
        self._recovering_since: float | None = None
        self.postcopy_at: float | None = None  # since the migration began, seconds
        self._last_transferred = -1
        self._progress_at = time.monotonic()
        # Shared-nothing (params.copy_datastore): what is copied, where it goes, how far.
        self.copy_plan: DiskCopyPlan | None = None
        self.nbd_targets: NbdTargets | None = None
        self.mirror_status: MirrorStatus | None = None
        self._mirror_started_at: float | None = None
        self.disk_copy_ms: float | None = None
        self._mirror_best = (-1, 0.0)  # least remaining bytes seen, and when
        self._pre_switchover_since: float | None = None

    @staticmethod
    def host_copy(h: Host) -> Host:
        """What the port needs of a host, detached from the database session."""
        return Host(name=h.name, agent_url=h.agent_url, token=h.token, facts=h.facts)

    async def _call(
        self, host: Host, step: str, fn: Callable[[AgentClient], T], timeout_s: float = 120.0
    ) -> T:
        try:
            return await self._call_raw(host, fn, timeout_s)
        except ClientError as exc:
            raise StepError(step, f"host {host.name}: {exc}", vm=self.vm, host=host.name) from exc

    async def _call_raw(
        self, host: Host, fn: Callable[[AgentClient], T], timeout_s: float = 120.0
    ) -> T:
        """One agent call in a worker thread; the client's own errors pass through."""

        def work() -> T:
            with self.inventory.agents.client(host.agent_url, host.token, timeout_s) as client:
                return fn(client)

        return await asyncio.to_thread(work)

    # ------------------------------------------------------------------ the actions

    async def prechecks(self) -> None:
        not_shared: frozenset[str] = frozenset()

        def check() -> None:
            nonlocal not_shared
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, self.vm)
                hosts = self.inventory.host_views(s)
                not_shared = self.inventory.not_shared(s, self.spec, self.source, self.destination)
                # This task itself counts as committed memory on the destination.
                dst = hosts.get(self.destination)
                if dst is not None:
                    hosts[self.destination] = replace(
                        dst, committed_mib=dst.committed_mib - self.spec.memory
                    )
                inp = PrecheckInput(
                    vm_view(self.spec, row.host.name, row.state, False),
                    self.destination,
                    hosts,
                    tls=self.params.tls,
                    copy_to=self.params.copy_datastore,
                    not_shared=not_shared,
                )
            refusals = precheck(inp)
            if refusals:
                raise Refused(self.vm, refusals)

        await asyncio.to_thread(check)
        if self.params.copy_datastore is not None:
            await self._plan_copy(not_shared)
        # Which of the destination's addresses the stream goes to, and the path's RTT: the
        # destination's stream count depends on it, so it is known before preparing it.
        try:
            self.reach = await route(self.inventory, self.vm, self._src, self._dst)
        except StepError as exc:
            # The source agent could not say (not "unreachable", which refuses): the stream
            # goes to the destination's preferred address, as one classic stream.
            self.warnings.append(f"no route measured: {exc}")
        if self.reach is not None:
            history = await asyncio.to_thread(history_bandwidth, self.db, self._src, self._dst)
            streams = streams_of(
                self.reach,
                self._src,
                self._dst,
                limits_of(self.params),
                history,
                tls=self.params.tls,
            )
            self.params = self.params.model_copy(update={"multifd_channels": streams})
        # Measuring takes a few hundred ms: it overlaps with preparing the destination, which
        # needs none of it (the plan sets only source-side capabilities and parameters).
        self._planning = asyncio.ensure_future(self._measure_and_plan())

    async def _plan_copy(self, not_shared: frozenset[str]) -> None:
        """Which disks a shared-nothing migration copies, with their sizes (the source's)."""
        assert self.params.copy_datastore is not None
        usage = await self._call(self._src, "prechecks", lambda c: c.disks(self.vm))
        try:
            self.copy_plan = copy_plan(self.spec, self.params, not_shared, usage)
        except ValueError as exc:
            raise StepError("prechecks", str(exc), vm=self.vm) from exc

    def close(self) -> None:
        """The task ended: measurements still under way are for nothing."""
        if self._planning is not None:
            self._planning.cancel()
            self._planning = None

    async def _planned(self) -> None:
        if self._planning is not None:
            await self._planning
            self._planning = None

    async def _measure_and_plan(self) -> None:
        """The convergence plan: what QEMU is told at the start and the ladder it may climb."""
        limits = limits_of(self.params)
        try:
            p, self.prediction = await measure(
                self.db,
                self.inventory,
                self.vm,
                self._src,
                self._dst,
                limits,
                quick=True,
                reach=self.reach,
                tls=self.params.tls,
            )
        except Exception as exc:
            # Measuring is advice: whatever fails in it (an agent, a bug), the migration goes
            # on, and the ladder works from QEMU's own figures. (CancelledError is not caught.)
            self.warnings.append(f"no prediction: {exc}")
            p = self._unmeasured_plan()
        self.params = apply_plan(self.params, p)
        if p.xbzrle_cache_bytes and not self.params.xbzrle_cache_bytes:
            self.warnings.append(
                "xbzrle left off: QEMU does not combine it with multifd streams "
                f"({self.params.multifd_channels})"
            )
        self.ladder = Ladder.start(p, now=0.0)

    def _unmeasured_plan(self, throughput_bps: float | None = None) -> Plan:
        """Without measurements: the operator's limits, and timeouts from what the stream
        carries now if it runs (else the bandwidth cap), auto-converge armed."""
        rate = throughput_bps if throughput_bps and throughput_bps >= 1.0 else None
        p = plan(
            self.spec.memory << 20,
            self.spec.memory << 20,
            DirtyMeasure(),
            PathMeasure(bandwidth_bps=rate or float(self.params.max_bandwidth)),
            limits_of(self.params),
        )
        return replace(p, auto_converge=True)

    async def prepare_destination(self) -> str:
        chosen = self.reach.address if self.reach is not None else None
        listen: IPv4Address | None = None
        with contextlib.suppress(ValueError):  # a host name (agent URL): its default then
            listen = IPv4Address(chosen) if chosen else None
        req = IncomingRequest(
            spec=self.spec, params=self.params, address=listen, copy_disks=self.copy_plan
        )
        resp = await self._call(self._dst, "prepare destination", lambda c: c.incoming(req))
        self.nbd_targets = resp.nbd
        if self.copy_plan is not None and resp.nbd is None:
            raise StepError("prepare destination", "the destination exported no disks", vm=self.vm)
        if chosen is not None and resp.port is not None and chosen in resp.addresses:
            self.migration_address = chosen
            return f"tcp:{chosen}:{resp.port}"
        self.migration_address = resp.uri.split(":")[1] if resp.uri.count(":") == 2 else None
        return resp.uri

    async def mirror_disks(self) -> bool:
        """Start the source's mirror into the destination's disks, or see how far it got:
        True once every disk is in sync and guest writes reach both copies."""
        now = time.monotonic()
        if self._mirror_started_at is None:
            targets = self.nbd_targets
            if targets is None:
                raise StepError("mirror", "no destination disks to mirror into", vm=self.vm)
            capped = self.params.max_bandwidth < UNLIMITED_BANDWIDTH
            by_index = dict(enumerate(targets.disks))
            req = NbdMirrorRequest(
                host=IPv4Address(targets.host),
                port=targets.port,
                exports=targets.exports,
                targets=[by_index[e.index] for e in targets.exports if e.index in by_index],
                tls=self.params.tls,
                tls_hostname=self.params.tls_hostname,
                speed=max(self.params.max_bandwidth // len(targets.exports), 1) if capped else None,
            )
            await self._planned()  # the measurements use the same link: not during the copy
            self.mirror_status = await self._call(
                self._src, "mirror", lambda c: c.disk_mirror(self.vm, req), timeout_s=60
            )
            self._mirror_started_at = now
            self._mirror_best = (self.mirror_status.remaining_bytes, now)
        else:
            await asyncio.sleep(MIRROR_POLL_S)
            self.mirror_status = await self._call(
                self._src, "mirror", lambda c: c.disk_mirror_status(self.vm), timeout_s=30
            )
        st = self.mirror_status
        if st.phase not in ("mirroring", "ready"):
            raise StepError(
                "mirror", f"the disk copy {st.phase}: {st.error}", vm=self.vm, retryable=False
            )
        if st.synced and all(d.actively_synced for d in st.disks):
            self.disk_copy_ms = (time.monotonic() - self._mirror_started_at) * 1000
            return True
        best, since = self._mirror_best
        if st.remaining_bytes < best or st.rate_bps > 0:
            self._mirror_best = (min(st.remaining_bytes, best), time.monotonic())
        elif time.monotonic() - since > MIRROR_STALL_S:
            raise StepError(
                "mirror",
                f"the disk copy gained nothing for {MIRROR_STALL_S:.0f} s "
                f"({st.remaining_bytes} bytes left)",
                vm=self.vm,
                host=self.source,
                retryable=False,
            )
        return False

    async def start_migration(self, uri: str) -> None:
        await self._planned()
        self.stream_uri = uri
        req = OutgoingRequest(uri=uri, params=self.params, peer=self._switchover_peer())
        self.last_stats = await self._call(
            self._src, "start migration", lambda c: c.migrate(self.vm, req)
        )
        self.migrate_issued_at = time.monotonic()

    def _switchover_peer(self) -> PeerRef:
        """How the source agent calls the destination at switchover: on a TLS cluster by its
        mutual-TLS port, with no bearer token (the certificates authenticate both)."""
        facts = self._dst.facts or {}
        port, address = facts.get("peer_port"), facts.get("address")
        if self.params.tls and port and address:
            return PeerRef(url=f"https://{address}:{port}", token=None, vm=self.vm)
        return PeerRef(url=self._dst.agent_url, token=self._dst.token, vm=self.vm)

    async def progress(self, known_status: QemuMigrationStatus | None) -> MigrationStats:
        stats = await self._call(
            self._src,
            "monitor",
            lambda c: c.migration(self.vm, wait_ms=PROGRESS_WAIT_MS, known_status=known_status),
            timeout_s=30,
        )
        for _ in range(25):
            # QEMU flips the status to completed a moment before it fills in the totals.
            if stats.status != QemuMigrationStatus.COMPLETED or stats.total_time_ms:
                break
            await asyncio.sleep(0.02)
            stats = await self._call(self._src, "monitor", lambda c: c.migration(self.vm))
        self.last_stats = stats
        now = time.monotonic()
        if stats.status in POSTCOPY and self.postcopy_at is None:
            since = self.migrate_issued_at
            self.postcopy_at = round(now - since, 3) if since is not None else 0.0
        recovering = stats.status in (
            QemuMigrationStatus.POSTCOPY_RECOVER_SETUP,
            QemuMigrationStatus.POSTCOPY_RECOVER,
        )
        if not recovering:
            self._recovering_since = None
        elif self._recovering_since is None:
            self._recovering_since = now
        elif now - self._recovering_since > POSTCOPY_RECOVER_S:
            # A reconnection stuck (a handshake on a half-dead link): ended and tried again.
            self._recovering_since = None
            raise self._broken(
                f"the postcopy stream is still {stats.status} after {POSTCOPY_RECOVER_S:.0f} s"
            )
        if recovering:
            pass
        elif stats.status == QemuMigrationStatus.POSTCOPY_ACTIVE:
            if stats.transferred != self._last_transferred:
                self._last_transferred, self._progress_at = stats.transferred, now
            elif now - self._progress_at > POSTCOPY_STALL_S:
                self._progress_at = now  # one recovery per stall
                raise self._broken(
                    f"the postcopy stream moved nothing for {POSTCOPY_STALL_S:.0f} s"
                )
        elif stats.transferred != self._last_transferred or stats.status not in MOVING:
            self._last_transferred, self._progress_at = stats.transferred, now
        elif now - self._progress_at > STALL_TIMEOUT_S:
            raise self._broken(f"no data moved for {STALL_TIMEOUT_S:.0f} s")
        if stats.status != QemuMigrationStatus.PRE_SWITCHOVER:
            self._pre_switchover_since = None
        elif self._pre_switchover_since is None:
            self._pre_switchover_since = now
        elif now - self._pre_switchover_since > PRE_SWITCHOVER_STUCK_S:
            raise self._broken(
                f"the source has held the guest paused at pre-switchover for "
                f"{PRE_SWITCHOVER_STUCK_S:.0f} s"
            )
        if stats.status == QemuMigrationStatus.ACTIVE:
            await self._climb(stats, now)
        if self.ladder is not None:
            stats.rung = self.ladder.rung.value
            stats.downtime_limit_ms = self.ladder.downtime_ms
        return stats

    def _broken(self, why: str) -> StepError:
        """The stream is stuck although the source answered: asking again cannot help (the
        machine rolls back before postcopy, recovers the stream in it)."""
        return StepError("monitor", why, vm=self.vm, host=self.source, retryable=False)

    async def _climb(self, stats: MigrationStats, now: float) -> None:
        """One progress sample: recorded, and given to the convergence ladder."""
        if self.migrate_issued_at is None and stats.total_time_ms is not None:
            # A manager that restarted mid-migration: QEMU's clock says when it began, and
            # the timeouts hold from there (the rungs climbed before are QEMU's already).
            self.migrate_issued_at = now - stats.total_time_ms / 1000
        if self.migrate_issued_at is None:
            return
        if self.ladder is None:
            self.ladder = Ladder.start(self._unmeasured_plan(stats.throughput_bps), now=0.0)
        at = now - self.migrate_issued_at
        if self.samples and stats.throttle_pct > 1:
            self.throttled_s += at - self.samples[-1].t_s
        before = self.ladder
        self.ladder, decision = self.ladder.decide(
            Sample(
                at=at,
                passes=stats.passes,
                remaining=stats.remaining,
                throughput_bps=stats.throughput_bps,
                dirty_bps=stats.dirty_bps,
                throttle_pct=stats.throttle_pct,
                expected_downtime_ms=stats.expected_downtime_ms,
            )
        )
        if len(self.samples) >= MAX_SAMPLES:
            # A long migration keeps every other sample: the record stays bounded.
            self.samples = self.samples[::2]
        self.samples.append(
            FlightSample(
                t_s=round(at, 3),
                transferred=stats.transferred,
                remaining=stats.remaining,
                dirty_bps=stats.dirty_bps,
                throughput_bps=round(stats.throughput_bps),
                throttle_pct=stats.throttle_pct,
                passes=stats.passes,
                rung=self.ladder.rung.value,
                downtime_limit_ms=self.ladder.downtime_ms,
            )
        )
        if decision.abort:
            raise StepError(
                "converge", decision.abort, vm=self.vm, host=self.source, retryable=False
            )
        if decision.changes:
            tune = MigrationTune(
                downtime_limit_ms=decision.downtime_ms,
                throttle_pct=decision.throttle_pct,
                start_postcopy=decision.start_postcopy,
            )
            if decision.start_postcopy:
                # Set before asking: an answer lost on the way must not let a rollback
                # remove a destination that already runs the VM.
                self.postcopy_requested = True
            try:
                await self._call_raw(self._src, lambda c: c.tune_migration(self.vm, tune))
            except ClientError as exc:
                # The migration goes on at the rung below; the next pass asks again. So the
                # ladder stays where QEMU is (what it learnt of the passes kept): a ladder
                # that believed the change applied would never ask for it again.
                self.warnings.append(f"could not apply {decision.note}: {exc}")
                self.ladder = replace(
                    self.ladder,
                    rung=before.rung,
                    downtime_ms=before.downtime_ms,
                    rung_since_pass=before.rung_since_pass,
                    history=before.history,
                )
                self.samples[-1].rung = before.rung.value
                self.samples[-1].downtime_limit_ms = before.downtime_ms

    async def verify_destination(self) -> None:
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while True:
            info = await self._call(self._dst, "verify destination", lambda c: c.vm(self.vm))
            if info.state == VmState.RUNNING:
                with_events = await self._call(
                    self._dst, "verify destination", lambda c: c.migration(self.vm)
                )
                self.destination_events = with_events.events
                if self.params.copy_datastore is not None:
                    # It runs on the copies: from now on they are its disks, never removed
                    # as an unfinished copy's (persisted by this step, repeated on resume).
                    await self._call(
                        self._dst, "verify destination", lambda c: c.keep_disks(self.vm)
                    )
                return
            if info.state in (VmState.STOPPED, VmState.CRASHED) or time.monotonic() > deadline:
                raise StepError(
                    "verify destination",
                    f"destination QEMU is {info.state} ({info.qemu_status})",
                    vm=self.vm,
                    host=self.destination,
                )
            await asyncio.sleep(0.02)

    async def announce(self) -> None:
        await self._call(self._dst, "announce", lambda c: c.announce(self.vm))

    async def stop_source(self) -> None:
        await self._call(self._src, "stop source", lambda c: c.release(self.vm))

    async def _refresh_destination_events(self) -> None:
        """The destination's first frames come after its resume (verify saw the resume): the
        events once more, for the report's switchover timeline."""
        with contextlib.suppress(StepError):
            got = await self._call(self._dst, "report", lambda c: c.migration(self.vm), 5.0)
            if got.events:
                self.destination_events = got.events

    async def update_inventory(self) -> None:
        disks = None
        if self.params.copy_datastore is not None:
            # The destination's definition names the copies (a restarted manager has no
            # other record of their paths); what it answered when prepared, if it cannot say.
            try:
                info = await self._call(self._dst, "update inventory", lambda c: c.vm(self.vm))
                disks = info.spec.disks
            except StepError as exc:
                # The VM runs there whatever the answer: the host is recorded regardless.
                if self.nbd_targets is not None:
                    disks = self.nbd_targets.disks
                    self.warnings.append(f"the copies' paths as prepared, not as defined: {exc}")
                else:
                    self.warnings.append(f"the inventory still names the old disks: {exc}")

        def update() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, self.vm)
                row.host = self.inventory.host_by_name(s, self.destination)
                row.state = VmState.RUNNING
                if disks is not None:
                    spec = VmSpec.model_validate(row.spec)
                    row.spec = spec.model_copy(update={"disks": disks}).model_dump(mode="json")

        await asyncio.to_thread(update)
        # After the inventory is committed: the report's last marks only.
        await self._refresh_destination_events()

    async def rollback(
        self, cancel_migration: bool, teardown_destination: bool, stop_mirror: bool = False
    ) -> None:
        """Before switchover: stop QEMU's migration, make sure the source runs, and only then
        remove the destination.

        QEMU may complete the migration at any moment until the source confirms the cancel.
        Whenever completion shows (before or after the cancel, or as the source agent refusing
        to resume a VM that migrated away), the destination owns the VM: ``SwitchedOver``
        sends the engine forward. The destination is deleted only once the source is confirmed
        running with no migration under way; when that cannot be confirmed (the source agent
        does not answer) the destination is kept and recorded in ``leftovers``, unless it
        already runs, which proves the switchover happened.
        """
        if self._planning is not None:
            self._planning.cancel()  # measurements for a migration that will not start
            self._planning = None
        try:
            if cancel_migration:
                await self._cancel_on_source()
            if stop_mirror:
                await self._stop_mirror()
            status = await self._resume_source()
        except StepError as exc:
            await self._forward_if_destination_runs()
            if teardown_destination:
                self._keep_destination(f"the source could not be confirmed running ({exc})")
            raise
        if status != "running":
            await self._forward_if_destination_runs()
            if teardown_destination:
                self._keep_destination(f"the source QEMU is {status}, not running")
            raise StepError("rollback", f"source QEMU is {status} after rollback", vm=self.vm)
        if cancel_migration or self.migrate_issued_at is not None:
            # The source's stop may already have steered the network away: win it back.
            with contextlib.suppress(StepError):
                await self._call(self._src, "rollback", lambda c: c.announce(self.vm))
        if teardown_destination:
            try:
                await self._call(self._dst, "rollback", lambda c: _delete(c, self.vm))
            except StepError as exc:
                # The source runs, so whatever is left there is not the VM; report it.
                self._keep_destination(f"it could not be removed ({exc})")
                raise

    async def _stop_mirror(self) -> None:
        """The source stops copying into the destination (which is removed next, its new
        disks with it). A source that cannot say is not fatal: its mirror then fails on its
        own when the destination goes, and the next migration clears it."""
        try:
            await self._call(self._src, "rollback", lambda c: c.disk_mirror_abort(self.vm))
        except StepError as exc:
            self.warnings.append(f"the source's disk mirror not stopped: {exc}")

    async def _cancel_on_source(self) -> None:
        """QEMU's migrate_cancel, then wait until the source's migration has settled."""
        before = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
        if before.status == QemuMigrationStatus.COMPLETED:
            raise SwitchedOver("the source reports the migration completed")
        if before.status in POSTCOPY:
            raise InPostcopy("the migration is in postcopy: the destination runs the VM")
        deadline = time.monotonic() + SWITCHOVER_WAIT_S
        while before.status in SWITCHING and time.monotonic() < deadline:
            # Mid-switchover the network is being steered to the destination: cancelling now
            # would leave it pointing there; the switchover ends in moments either way.
            await asyncio.sleep(0.05)
            before = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
            if before.status == QemuMigrationStatus.COMPLETED:
                raise SwitchedOver("the migration completed during the switchover")
        if before.status not in IDLE:
            try:
                await self._call(self._src, "rollback", lambda c: c.cancel_migration(self.vm))
            except StepError as exc:
                # Refused (the switch to postcopy came first) or lost: what QEMU says decides.
                now = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
                if now.status in POSTCOPY:
                    raise InPostcopy("the migration went into postcopy before the cancel") from exc
                raise
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        again_at = time.monotonic() + RECANCEL_S
        while True:
            stats = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
            if stats.status == QemuMigrationStatus.COMPLETED:
                raise SwitchedOver("the migration completed before it could be cancelled")
            if stats.status in POSTCOPY:
                raise InPostcopy("the migration went into postcopy before it was cancelled")
            if stats.status in IDLE:
                return
            if stats.status == QemuMigrationStatus.CANCELLING and time.monotonic() > again_at:
                # Still stuck on a dead link: the agent yanks the channels again (a channel
                # still connecting at the first yank was not among them).
                again_at = time.monotonic() + RECANCEL_S
                await self._call(self._src, "rollback", lambda c: c.cancel_migration(self.vm))
            if time.monotonic() > deadline:
                raise StepError(
                    "rollback",
                    f"the source's migration is still {stats.status} "
                    f"{SETTLE_TIMEOUT_S:.0f} s after the cancel",
                    vm=self.vm,
                    host=self.source,
                )
            await asyncio.sleep(0.05)

    async def _resume_source(self) -> str:
        try:
            return await self._call_raw(self._src, lambda c: c.resume(self.vm))
        except ApiError as exc:
            if exc.detail.code == IN_POSTCOPY:
                raise InPostcopy(str(exc)) from exc
            if exc.detail.code == MIGRATED_AWAY:
                raise SwitchedOver(str(exc)) from exc
            raise StepError("rollback", f"host {self.source}: {exc}", vm=self.vm) from exc
        except ClientError as exc:
            raise StepError(
                "rollback", f"host {self.source}: {exc}", vm=self.vm, host=self.source
            ) from exc

    async def _forward_if_destination_runs(self) -> None:
        """A running destination QEMU proves the switchover: it only runs once it received
        the whole state, after which the source never resumes on its own."""
        with contextlib.suppress(StepError):
            info = await self._call(self._dst, "rollback", lambda c: c.vm(self.vm))
            if info.state == VmState.RUNNING and self.postcopy_requested:
                # It runs from the moment postcopy starts, with pages still on the source.
                raise InPostcopy(f"the destination {self.destination} runs the VM in postcopy")
            if info.state == VmState.RUNNING:
                raise SwitchedOver(f"the destination {self.destination} runs the VM")

    def _keep_destination(self, why: str) -> None:
        self.leftovers.append(
            Leftover(
                host=self.destination,
                vm=self.vm,
                what="destination QEMU (incoming migration) not removed",
                why=why,
            )
        )

    async def recover(self) -> None:
        """After switchover the destination does not run: remove it, then resume the source.

        If the destination cannot be reached its QEMU might still run; resuming the source
        then risks two copies, so that is refused and left to the operator. A migration that
        could have gone postcopy (a short postcopy can complete between two polls) is never
        recovered on the source: the destination may have written what the source lacks.
        """
        if self.params.postcopy and await self._may_have_gone_postcopy():
            raise StepError(
                "recover",
                "postcopy was allowed: the source's copy may be stale, so it is not resumed "
                "and the destination is kept",
                vm=self.vm,
                retryable=False,
            )
        await self._call(self._dst, "recover", lambda c: _delete(c, self.vm))
        if self.params.copy_datastore is not None:
            await self._stop_mirror()
        status = await self._call(
            self._src, "recover", lambda c: c.resume(self.vm, after_failed_switchover=True)
        )
        if status != "running":
            raise StepError("recover", f"source QEMU is {status}", vm=self.vm)

    async def recover_postcopy(self) -> None:
        """A broken or stalled postcopy stream: the destination listens again, the source
        reconnects to it. Nothing is removed or resumed elsewhere whatever fails; the
        machine asks again (spaced, so a link that is down is waited out)."""
        try:
            # The URI the task persisted: an agent that restarted has forgotten its own.
            known = PostcopyRecovery(uri=self.stream_uri)
            got = await self._call(
                self._dst, "postcopy", lambda c: c.recover_incoming(self.vm, known), timeout_s=30
            )
            await self._call(
                self._src, "postcopy", lambda c: c.resume_outgoing(self.vm, got), timeout_s=30
            )
        except StepError:
            await asyncio.sleep(POSTCOPY_RETRY_S)
            raise
        self._progress_at = time.monotonic()

    async def _may_have_gone_postcopy(self) -> bool:
        """Whether this migration may have switched to postcopy (then the source's copy is
        stale): asked for, or in the source's record of QEMU's statuses; unknown counts."""
        if self.postcopy_requested:
            return True
        try:
            stats = await self._call(self._src, "recover", lambda c: c.migration(self.vm))
        except StepError:
            return True
        return any(s.startswith("postcopy") for s, _ in stats.events)


def _delete(client: AgentClient, vm: str) -> None:
    with contextlib.suppress(NotFound):
        client.delete(vm, force=True)
