"""The migration engine's port in the manager: each action of a live migration done through
the two agents.

The port sequences the steps (libvirt's, by who runs them: prepare on the destination, perform
on the source, finish on the destination, confirm on the source) and steers convergence; what
it builds on has its own module: the agent calls (``ends``), the stall timers (``watchdog``),
the record the report reads (``flight``), a shared-nothing migration's disk copy
(``shared_nothing``), the steps that commit (``finish``) and the undo steps (``undo``). Every
agent call of the migration carries its id (``migration_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from ipaddress import IPv4Address

from qmotion.api.migration import (
    IncomingRequest,
    MigrationParams,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PeerRef,
    PostcopyRecovery,
    QemuMigrationStatus,
)
from qmotion.api.vm import VmSpec, VmState
from qmotion.client.errors import ClientError
from qmotion.migration.convergence import (
    Ladder,
    Plan,
    Sample,
)
from qmotion.migration.errors import Refused, StepError
from qmotion.migration.prechecks import PrecheckInput, VmView, precheck
from qmotion.migration.timeline import Stopwatch, ended_at
from qmotion.migration.vocabulary import POSTCOPY
from qmotion.server.db import Database
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.ends import Ends, delete_vm, host_copy
from qmotion.server.tasks.finish import Commit
from qmotion.server.tasks.flight import FlightRecorder
from qmotion.server.tasks.measure import path_history, route, streams_of
from qmotion.server.tasks.planning import Planning, limits_of
from qmotion.server.tasks.shared_nothing import SharedNothing
from qmotion.server.tasks.undo import Undo
from qmotion.server.tasks.watchdog import Watchdog

PROGRESS_WAIT_MS = 500
POSTCOPY_RETRY_S = 2.0  # between attempts to resume a broken postcopy stream


async def _nothing() -> None:
    return None


def vm_view(
    spec: VmSpec, host: str, state: str, migrating: bool, attention: str | None = None
) -> VmView:
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
        attention=attention,
    )


def _close_enough(prepared: int, wanted: int) -> bool:
    """Multifd streams either both or neither, and within one of each other."""
    return (prepared > 0) == (wanted > 0) and abs(prepared - wanted) <= 1


class AgentMigrationPort(Planning):
    """One migration of ``vm`` from ``source`` to ``destination``, by its id ``migration_id``.
    ``clock``: monotonic seconds, for its timeouts, stall timers and flight record; ``sleep``:
    its waits; ``on_postcopy_requested``: persists that postcopy is asked for (it is awaited
    before the asking)."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        vm: str,
        source: str,
        destination: str,
        params: MigrationParams,
        clock: Callable[[], float] = time.monotonic,
        *,
        migration_id: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_postcopy_requested: Callable[[], Awaitable[None]] = _nothing,
        accepted: float | None = None,
    ) -> None:
        self.db, self.inventory = db, inventory
        self.vm, self.source, self.destination, self.params = vm, source, destination, params
        self.migration_id = migration_id
        self._clock, self._sleep = clock, sleep
        self._on_postcopy_requested = on_postcopy_requested
        # Accepted -> stream started, step by step (the report's and the task's timeline).
        self.watch = Stopwatch(origin=accepted, clock=clock)
        self.timeline_recorded = False  # the task has its "timeline" event
        with db.session() as s:
            row = inventory.vm_by_name(s, vm)
            self.spec = VmSpec.model_validate(row.spec)
            src = host_copy(inventory.host_by_name(s, source))
            dst = host_copy(inventory.host_by_name(s, destination))
        self.ends = Ends(inventory, vm, src, dst, migration_id)
        self.flight = FlightRecorder(
            vm,
            source,
            destination,
            tls=params.tls,
            streams=params.multifd_channels,
            destination_start=params.destination_start,
        )
        # Shared-nothing (params.copy_datastore): what is copied, where it goes, how far.
        self.disks = SharedNothing(vm, self.ends, self.flight)
        self.undo = Undo(self.ends, self.disks, self.flight, clock, sleep)
        self.commit = Commit(self.ends, self.flight, clock, sleep)
        self.watchdog = Watchdog(progress_at=clock())
        self.ladder: Ladder | None = None
        self._planning: asyncio.Future[Plan | None] | None = None
        self._routing: asyncio.Future[PathProbe | None] | None = None
        self._history: float | None = None  # the path's rate on its last migration
        self.reach: PathProbe | None = None
        self._path_known = False  # an earlier migration on this path measured its rate
        # From then on the destination may run the VM (persisted before the asking).
        self.postcopy_requested = False
        self.stream_uri: str | None = None  # where the destination listens (persisted)

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
                    vm_view(self.spec, row.host.name, row.state, False, row.attention),
                    self.destination,
                    hosts,
                    tls=self.params.tls,
                    copy_to=self.params.copy_datastore,
                    not_shared=not_shared,
                )
            refusals = precheck(inp)
            if refusals:
                raise Refused(self.vm, refusals)

        with self.watch.step("pre-checks"):
            await asyncio.to_thread(check)
        if self.params.copy_datastore is not None:
            await self.disks.plan_copy(self.spec, self.params, not_shared)
        with self.watch.step("path history"):
            past = await asyncio.to_thread(path_history, self.db, self.source, self.destination)
        self._history = past.bandwidth_bps if past is not None else None
        self._path_known = self._history is not None
        # Which of the destination's addresses the stream goes to, and the path's RTT: the
        # destination's stream count depends on it, so it is known before preparing it.
        known = past.route(self.ends.dst) if past is not None else None
        if known is not None and self.params.copy_datastore is None:
            # The route the last migration on this path took: the destination is prepared
            # with it while the route is checked again (``_route_checked``).
            self._routing = asyncio.ensure_future(self._route("route (checked again, beside)"))
            self._take_route(known)
        else:
            self._take_route(await self._route("route"))
        # Measuring takes a few hundred ms: it overlaps with preparing the destination, which
        # needs none of it (the plan sets only source-side capabilities and parameters).
        self._planning = asyncio.ensure_future(self._measure_and_plan(self._routing))

    async def _route(self, step: str) -> PathProbe | None:
        """The route measured now; None: the source agent could not say (not "unreachable",
        which refuses): the stream then goes to the destination's preferred address, as one
        classic stream."""
        try:
            with self.watch.step(step):
                return await route(self.inventory, self.vm, self.ends.src, self.ends.dst)
        except StepError as exc:
            self.flight.warnings.append(f"no route measured: {exc}")
            return None

    def _take_route(self, reach: PathProbe | None, streams: int | None = None) -> None:
        """The stream goes this way; ``streams``: the count the destination was prepared
        with (else the one this route calls for)."""
        self.reach = reach
        if reach is None:
            return
        self.flight.unreachable = list(reach.unreachable)
        streams = self._streams(reach) if streams is None else streams
        self.params = self.params.model_copy(update={"multifd_channels": streams})
        self.flight.streams = streams

    def _streams(self, reach: PathProbe) -> int:
        src, dst = self.ends.src, self.ends.dst
        limits = limits_of(self.params)
        return streams_of(reach, src, dst, limits, self._history, tls=self.params.tls)

    async def _route_checked(self) -> bool:
        """The route checked again beside preparing the destination: False if the
        destination must be prepared again (another address now, or a stream count far from
        the one it was prepared with: one stream more or less only changes how fast the
        copy may go, and both ends agree on it). No address answering now, or an MTU
        mismatch, fails the step: the rollback removes the destination, which holds nothing
        yet (on a path with no history the same findings refuse before anything is made)."""
        if self._routing is None:
            return True
        routing, self._routing = self._routing, None
        try:
            fresh = await routing
        except Refused as exc:
            raise StepError(
                "route",
                f"checked again beside preparing the destination: {exc}",
                vm=self.vm,
                retryable=False,
            ) from exc
        if fresh is None or self.reach is None:
            return True  # not measured now: the last migration's route stands
        prepared, wanted = self.params.multifd_channels, self._streams(fresh)
        if fresh.address == self.reach.address and _close_enough(prepared, wanted):
            self._take_route(fresh, streams=prepared)
            return True
        self.flight.warnings.append(
            f"the path to {self.destination} changed since the last migration on it (then "
            f"{self.reach.address}, {prepared} streams; now {fresh.address}, {wanted}): the "
            "destination was prepared again"
        )
        self._take_route(fresh)
        return False

    def close(self) -> None:
        """The task ended: measurements still under way are for nothing (one that ended
        in an error is read, so it is not reported as lost)."""
        for running in (self._planning, self._routing):
            if running is not None and running.done() and not running.cancelled():
                running.exception()
            elif running is not None:
                running.cancel()
        self._planning = self._routing = None

    async def prepare_destination(self) -> str:
        uri = await self._prepare("prepare destination")
        if not await self._route_checked():
            # Prepared for the old route (its address, its stream count), and holding nothing
            # (no stream was sent): removed, and prepared for the route measured now.
            await self.ends.destination(
                "prepare destination", lambda c: delete_vm(c, self.vm, self.migration_id)
            )
            uri = await self._prepare("prepare destination again")
        return uri

    async def _prepare(self, step: str) -> str:
        chosen = self.reach.address if self.reach is not None else None
        listen: IPv4Address | None = None
        with contextlib.suppress(ValueError):  # a host name (agent URL): its default then
            listen = IPv4Address(chosen) if chosen else None
        req = IncomingRequest(
            spec=self.spec,
            migration_id=self.migration_id,
            params=self.params,
            address=listen,
            copy_disks=self.disks.plan,
            source=self._source_addresses(),
            source_host=self.ends.src.name,
        )
        began = self._clock()
        with self.watch.step(step):
            resp = await self.ends.destination("prepare destination", lambda c: c.incoming(req))
        self.watch.nest("destination", began, resp.steps, self._clock())
        self.disks.targets = resp.nbd
        if self.disks.plan is not None and resp.nbd is None:
            raise StepError("prepare destination", "the destination exported no disks", vm=self.vm)
        if chosen is not None and resp.port is not None and chosen in resp.addresses:
            self.flight.migration_address = chosen
            return f"tcp:{chosen}:{resp.port}"
        self.flight.migration_address = resp.uri.split(":")[1] if resp.uri.count(":") == 2 else None
        return resp.uri

    async def mirror_disks(self) -> bool:
        """Start the source's mirror into the destination's disks, or see how far it got:
        True once every disk is in sync and guest writes reach both copies."""
        now = self._clock()
        if not self.disks.started:
            req = self.disks.request(self.params)
            await self._planned()  # the measurements use the same link: not during the copy
            await self.disks.start(req, now)
        else:
            await self.disks.poll()
        return self.disks.synced(self._clock())

    async def start_migration(self, uri: str) -> None:
        if self._starts_before_plan() and not (self._planning and self._planning.done()):
            # Auto-converge armed dormant, as every plan has it; the plan's own figures
            # follow as a tune (``_plan_arrived``).
            self.params = self.params.model_copy(update={"auto_converge": True})
        else:
            with self.watch.step("wait for the plan"):
                await self._planned()
        self.stream_uri = uri
        req = OutgoingRequest(
            uri=uri,
            migration_id=self.migration_id,
            params=self.params,
            peer=self._switchover_peer(),
        )
        began = self._clock()
        with self.watch.step("start on the source"):
            self.flight.last_stats = await self.ends.source(
                "start migration", lambda c: c.migrate(self.vm, req)
            )
        answered = self._clock()
        steps = self.flight.last_stats.steps
        # The stream started when QEMU took `migrate`, not when the agent's answer arrived
        # (the stream's own first packets compete with that answer for the CPU).
        issued = ended_at(began, answered, steps, "migrate issued")
        self.flight.issued_at = answered if issued is None else issued
        self.watch.nest("source", began, steps, answered)
        self.flight.timeline = list(self.watch.steps)

    def _source_addresses(self) -> list[IPv4Address]:
        """Where the source agent may call the destination's peer port from: its addresses
        (management and migration). None known (an older agent's facts): no restriction."""
        facts = self.ends.src.facts or {}
        found = [facts.get("address")]
        found += [n.get("address") for n in facts.get("migration_networks", []) or []]
        out: list[IPv4Address] = []
        for a in found:
            with contextlib.suppress(ValueError, TypeError):
                if a and IPv4Address(a) not in out:
                    out.append(IPv4Address(a))
        return out

    def _switchover_peer(self) -> PeerRef:
        """How the source agent calls the destination at switchover: on a TLS cluster by its
        mutual-TLS port, with no bearer token (the certificates authenticate both)."""
        facts = self.ends.dst.facts or {}
        port, address = facts.get("peer_port"), facts.get("address")
        if self.params.tls and port and address:
            return PeerRef(url=f"https://{address}:{port}", token=None, vm=self.vm)
        return PeerRef(url=self.ends.dst.agent_url, token=self.ends.dst.token, vm=self.vm)

    async def progress(self, known_status: QemuMigrationStatus | None) -> MigrationStats:
        mid = self.migration_id
        stats = await self.ends.source(
            "monitor",
            lambda c: c.migration(
                self.vm, wait_ms=PROGRESS_WAIT_MS, known_status=known_status, migration=mid
            ),
            timeout_s=30,
        )
        for _ in range(25):
            # QEMU flips the status to completed a moment before it fills in the totals.
            if stats.status != QemuMigrationStatus.COMPLETED or stats.total_time_ms:
                break
            await self._sleep(0.02)
            stats = await self.ends.source("monitor", lambda c: c.migration(self.vm, migration=mid))
        self.flight.last_stats = stats
        now = self._clock()
        if stats.status in POSTCOPY:
            self.flight.mark_postcopy(now)
        stuck = self.watchdog.observe(stats, now)
        if stuck is not None:
            raise self._broken(stuck)
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
        flight = self.flight
        if flight.issued_at is None and stats.total_time_ms is not None:
            # A manager that restarted mid-migration: QEMU's clock says when it began, and
            # the timeouts hold from there (the rungs climbed before are QEMU's already).
            flight.issued_at = now - stats.total_time_ms / 1000
        if flight.issued_at is None:
            return
        if self._planning is not None and self._planning.done():
            arrived, self._planning = self._planning.result(), None
            if arrived is not None:  # a failed measurement: the interim ladder goes on
                await self._plan_arrived(arrived)
        if self.ladder is None:
            self.ladder = Ladder.start(self._unmeasured_plan(stats.throughput_bps), now=0.0)
        at = now - flight.issued_at
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
        flight.sample(stats, at, self.ladder)
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
            try:
                if decision.start_postcopy:
                    # Set and persisted before asking: an answer lost on the way, or a
                    # manager that restarts, must not let a rollback remove a destination
                    # that already runs the VM, nor take a postcopy for a finished migration.
                    self.postcopy_requested = True
                    await self._on_postcopy_requested()
                await self.ends.source_raw(lambda c: c.tune_migration(self.vm, tune))
            except ClientError as exc:
                # The migration goes on at the rung below; the next pass asks again. So the
                # ladder stays where QEMU is (what it learnt of the passes kept): a ladder
                # that believed the change applied would never ask for it again.
                flight.warnings.append(f"could not apply {decision.note}: {exc}")
                self._put_back(before)
            except Exception:
                self._put_back(before)  # not asked (the record failed): the next pass asks
                raise

    def _put_back(self, before: Ladder) -> None:
        """The ladder back where QEMU is, what it learnt of the passes kept."""
        assert self.ladder is not None
        self.ladder = replace(
            self.ladder,
            rung=before.rung,
            downtime_ms=before.downtime_ms,
            rung_since_pass=before.rung_since_pass,
            history=before.history,
        )
        self.flight.put_back(self.ladder)

    async def finish_destination(self) -> None:
        """libvirt's Finish: the word to the paused destination, and seeing it run
        (``finish.Commit``)."""
        await self.commit.finish_destination()

    async def announce(self) -> None:
        """The destination runs the VM: confirmed there, announced on the network."""
        await self.commit.confirm_destination()

    async def confirm_source(self) -> None:
        """libvirt's Confirm: the source lets the VM go (its QEMU ends)."""
        await self.commit.confirm_source()

    async def _refresh_destination_events(self) -> None:
        """The destination's first frames come after its resume (finish saw the resume): the
        events once more, for the report's switchover timeline."""
        with contextlib.suppress(StepError):
            got = await self.ends.destination(
                "report", lambda c: c.migration(self.vm, migration=self.migration_id), 5.0
            )
            if got.events:
                self.flight.destination_events = got.events

    async def update_inventory(self) -> None:
        disks = None
        if self.params.copy_datastore is not None:
            # The destination's definition names the copies (a restarted manager has no
            # other record of their paths); what it answered when prepared, if it cannot say.
            try:
                info = await self.ends.destination("update inventory", lambda c: c.vm(self.vm))
                disks = info.spec.disks
            except StepError as exc:
                # The VM runs there whatever the answer: the host is recorded regardless.
                if self.disks.targets is not None:
                    disks = self.disks.targets.disks
                    self.flight.warnings.append(
                        f"the copies' paths as prepared, not as defined: {exc}"
                    )
                else:
                    self.flight.warnings.append(f"the inventory still names the old disks: {exc}")

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
        remove the destination (``Undo.rollback``)."""
        self.close()  # measurements for a migration that will not start
        await self.undo.rollback(
            cancel_migration,
            teardown_destination,
            stop_mirror,
            postcopy_requested=self.postcopy_requested,
            wait_switchover=self.watchdog.stuck_in is None,
        )

    async def recover(self) -> None:
        """After switchover the destination agent said the VM does not run there: remove it,
        then resume the source (``Undo.recover``)."""
        await self.undo.recover(self.params, postcopy_requested=self.postcopy_requested)

    async def recover_postcopy(self) -> None:
        """A broken or stalled postcopy stream: the destination listens again, the source
        reconnects to it. Nothing is removed or resumed elsewhere whatever fails; the
        machine asks again (spaced, so a link that is down is waited out)."""
        try:
            # The URI the task persisted: an agent that restarted has forgotten its own.
            known = PostcopyRecovery(uri=self.stream_uri)
            got = await self.ends.destination(
                "postcopy", lambda c: c.recover_incoming(self.vm, known), timeout_s=30
            )
            await self.ends.source(
                "postcopy", lambda c: c.reconnect_outgoing(self.vm, got), timeout_s=30
            )
        except StepError:
            await self._sleep(POSTCOPY_RETRY_S)
            raise
        self.watchdog.recovered(self._clock())
