"""Undoing a live migration through its two agents: the rollback before the switchover, and
the recovery on the source after a switchover whose destination does not run.

Both undo only what is proven safe to undo: a destination goes only once the source is
confirmed running (or is proven to hold nothing of this migration), and a source is resumed
only if its copy of the VM cannot be stale. Every call names the migration (``ends.migration``):
the agents answer "completed" or "migrated away" only for it, refuse to resume a copy that went
away in another one (``stale_copy``), and remove a destination only if it is this migration's
and does not run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import Leftover, MigrationParams, MigrationStats, QemuMigrationStatus
from qmotion.api.vm import VmState
from qmotion.client.errors import ApiError, ClientError, Conflict
from qmotion.migration.errors import InPostcopy, StepError, SwitchedOver
from qmotion.migration.vocabulary import POSTCOPY
from qmotion.server.tasks.ends import Ends, delete_vm
from qmotion.server.tasks.flight import FlightRecorder
from qmotion.server.tasks.shared_nothing import SharedNothing

# Longer than the source agent may hold the guest at pre-switchover ending the disk mirrors.
SWITCHOVER_WAIT_S = 20.0
SWITCHING = frozenset({QemuMigrationStatus.DEVICE, QemuMigrationStatus.PRE_SWITCHOVER})
# QEMU's migrate_cancel shuts the stream's socket down, so a cancel settles at once; a source
# that has not settled after this long is reported, and its destination kept.
SETTLE_TIMEOUT_S = 60.0
RECANCEL_S = 3.0
KEPT = "destination QEMU (incoming migration) not removed"
IDLE = frozenset(
    {QemuMigrationStatus.NONE, QemuMigrationStatus.FAILED, QemuMigrationStatus.CANCELLED}
)  # no migration under way on the source


class StaleSource(StepError):
    """The source's copy went away in another migration (its agent said ``stale_copy``): it
    is never resumed, and this migration never started there."""


class Undo:
    """The undo steps of one migration, through ``ends``; what cannot be undone is recorded
    in the flight record's leftovers. ``clock`` and ``sleep``: the port's."""

    def __init__(
        self,
        ends: Ends,
        disks: SharedNothing,
        flight: FlightRecorder,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ends, self.disks, self.flight, self._clock = ends, disks, flight, clock
        self._sleep = sleep
        self.vm, self.source, self.destination = ends.vm, ends.src.name, ends.dst.name
        self.migration = ends.migration

    async def rollback(
        self,
        cancel_migration: bool,
        teardown_destination: bool,
        stop_mirror: bool,
        *,
        postcopy_requested: bool,
        wait_switchover: bool = True,
    ) -> None:
        """Before switchover: stop QEMU's migration, make sure the source runs, and only then
        remove the destination.

        QEMU may complete the migration at any moment until the source confirms the cancel.
        Whenever completion of this migration shows (before or after the cancel, or as the
        source agent refusing to resume a VM that migrated away in it), the destination owns
        the VM: ``SwitchedOver`` sends the engine forward. The destination is deleted only
        once the source is confirmed running with no migration under way; when that cannot be
        confirmed (the source agent does not answer) the destination is kept and recorded in
        ``leftovers``, unless it runs this migration's VM, which proves the switchover. A
        source whose copy went away in another migration (``stale_copy``) never sent this
        one: its destination holds nothing and goes. ``wait_switchover``: False when the
        stall watchdog already timed the switchover out (then it is cancelled at once).
        """
        try:
            if cancel_migration:
                await self._cancel_on_source(wait_switchover)
            if stop_mirror:
                await self.disks.stop()
            status = await self._resume_source()
        except StaleSource:
            await self._forward_if_destination_runs(postcopy_requested)
            if teardown_destination:
                with contextlib.suppress(StepError):
                    await self._teardown()
            raise
        except StepError as exc:
            await self._forward_if_destination_runs(postcopy_requested)
            if teardown_destination:
                await self._keep_destination(f"the source could not be confirmed running ({exc})")
            raise
        if status != "running":
            await self._forward_if_destination_runs(postcopy_requested)
            if teardown_destination:
                await self._keep_destination(f"the source QEMU is {status}, not running")
            raise StepError("rollback", f"source QEMU is {status} after rollback", vm=self.vm)
        if cancel_migration or self.flight.issued_at is not None:
            # The source's stop may already have steered the network away: win it back.
            with contextlib.suppress(StepError):
                await self.ends.source("rollback", lambda c: c.announce(self.vm))
        if teardown_destination:
            await self._teardown()

    async def _teardown(self) -> None:
        """This migration's destination goes (the agent refuses a VM that runs, or that is not
        this migration's: then nothing is removed, and what is left is recorded)."""
        try:
            await self.ends.destination("rollback", lambda c: delete_vm(c, self.vm, self.migration))
        except StepError as exc:
            await self._keep_destination(f"it could not be removed ({exc})")
            raise
        # Kept by an earlier try of this rollback, removed now: no longer a leftover.
        self.flight.leftovers[:] = [lo for lo in self.flight.leftovers if not self._kept(lo)]

    def _kept(self, lo: Leftover) -> bool:
        """``lo`` records this migration's destination as kept."""
        return (lo.host, lo.vm, lo.what) == (self.destination, self.vm, KEPT)

    async def _stats(self) -> MigrationStats:
        """The source's figures of this migration (status ``none`` if it is not there)."""
        return await self.ends.source(
            "rollback", lambda c: c.migration(self.vm, migration=self.migration)
        )

    async def _cancel(self) -> None:
        await self.ends.source(
            "rollback", lambda c: c.cancel_migration(self.vm, migration=self.migration)
        )

    async def _cancel_on_source(self, wait_switchover: bool = True) -> None:
        """QEMU's migrate_cancel, then wait until the source's migration has settled."""
        before = await self._stats()
        if before.status == QemuMigrationStatus.COMPLETED:
            raise SwitchedOver("the source reports the migration completed")
        if before.status in POSTCOPY:
            raise InPostcopy("the migration is in postcopy: the destination runs the VM")
        deadline = self._clock() + (SWITCHOVER_WAIT_S if wait_switchover else 0.0)
        while before.status in SWITCHING and self._clock() < deadline:
            # Mid-switchover the network is being steered to the destination: cancelling now
            # would leave it pointing there; the switchover ends in moments either way.
            await self._sleep(0.05)
            before = await self._stats()
            if before.status == QemuMigrationStatus.COMPLETED:
                raise SwitchedOver("the migration completed during the switchover")
        if before.status not in IDLE:
            try:
                await self._cancel()
            except StepError as exc:
                # Refused (the switch to postcopy came first) or lost: what QEMU says decides.
                now = await self._stats()
                if now.status in POSTCOPY:
                    raise InPostcopy("the migration went into postcopy before the cancel") from exc
                raise
        deadline = self._clock() + SETTLE_TIMEOUT_S
        again_at = self._clock() + RECANCEL_S
        while True:
            stats = await self._stats()
            if stats.status == QemuMigrationStatus.COMPLETED:
                raise SwitchedOver("the migration completed before it could be cancelled")
            if stats.status in POSTCOPY:
                raise InPostcopy("the migration went into postcopy before it was cancelled")
            if stats.status in IDLE:
                return
            if stats.status == QemuMigrationStatus.CANCELLING and self._clock() > again_at:
                # Still stuck on a dead link: the agent yanks the channels again (a channel
                # still connecting at the first yank was not among them).
                again_at = self._clock() + RECANCEL_S
                await self._cancel()
            if self._clock() > deadline:
                raise StepError(
                    "rollback",
                    f"the source's migration is still {stats.status} "
                    f"{SETTLE_TIMEOUT_S:.0f} s after the cancel",
                    vm=self.vm,
                    host=self.source,
                )
            await self._sleep(0.05)

    async def _resume_source(self) -> str:
        try:
            return await self.ends.source_raw(lambda c: c.resume(self.vm, migration=self.migration))
        except ApiError as exc:
            if exc.detail.code == AgentErrorCode.IN_POSTCOPY:
                raise InPostcopy(str(exc)) from exc
            if exc.detail.code == AgentErrorCode.MIGRATED_AWAY:
                raise SwitchedOver(str(exc)) from exc
            if exc.detail.code == AgentErrorCode.STALE_COPY:
                # Never "switched over": that copy went away in another migration.
                raise StaleSource(
                    "rollback",
                    f"host {self.source}: {exc}",
                    vm=self.vm,
                    host=self.source,
                    retryable=False,
                ) from exc
            raise StepError("rollback", f"host {self.source}: {exc}", vm=self.vm) from exc
        except ClientError as exc:
            raise StepError(
                "rollback", f"host {self.source}: {exc}", vm=self.vm, host=self.source
            ) from exc

    async def _forward_if_destination_runs(self, postcopy_requested: bool) -> None:
        """A running destination QEMU of this migration proves the switchover: it only runs
        once it received the whole state (or in postcopy), after which the source never
        resumes on its own. A VM there that did not arrive by this migration proves nothing."""
        with contextlib.suppress(StepError):
            info = await self.ends.destination_vm("rollback")
            if info is None or info.incoming_migration != self.migration:
                return
            if info.state == VmState.RUNNING and postcopy_requested:
                # It runs from the moment postcopy starts, with pages still on the source.
                raise InPostcopy(f"the destination {self.destination} runs the VM in postcopy")
            if info.state == VmState.RUNNING:
                raise SwitchedOver(f"the destination {self.destination} runs the VM")

    async def _keep_destination(self, why: str) -> None:
        """The destination is not removed: recorded, unless its agent says it holds nothing
        of this migration (no such VM, or a VM that did not arrive by it). One record per
        destination, however often the rollback was tried: the last try's."""
        self.flight.leftovers[:] = [lo for lo in self.flight.leftovers if not self._kept(lo)]
        with contextlib.suppress(StepError):
            info = await self.ends.destination_vm("rollback")
            if info is None or info.incoming_migration != self.migration:
                return
        self.flight.leftovers.append(
            Leftover(host=self.destination, vm=self.vm, what=KEPT, why=why)
        )

    async def recover(self, params: MigrationParams, *, postcopy_requested: bool) -> None:
        """The destination agent said the VM does not run there: asked once more (it runs:
        ``SwitchedOver``), it is removed by the id (refused if it runs), then the source,
        which holds the complete state, resumes (its agent refuses otherwise).

        A destination that cannot be asked is a retryable ``StepError``: its QEMU might run,
        and resuming the source then risks two copies. A migration that could have gone
        postcopy (a short postcopy can complete between two polls) is never recovered on the
        source: the destination may have written what the source lacks.
        """
        if params.postcopy and await self._may_have_gone_postcopy(postcopy_requested):
            raise StepError(
                "recover",
                "postcopy was allowed: the source's copy may be stale, so it is not resumed "
                "and the destination is kept",
                vm=self.vm,
                retryable=False,
            )
        info = await self.ends.destination_vm("recover")
        if info is not None and info.state == VmState.RUNNING:
            raise SwitchedOver(f"the destination {self.destination} runs the VM")
        if info is not None:
            await self._remove_for_recovery()
        if params.copy_datastore is not None:
            await self.disks.stop()
        try:
            status = await self.ends.source_raw(
                lambda c: c.resume(self.vm, after_failed_switchover=True, migration=self.migration)
            )
        except ApiError as exc:
            # Refused (a stale copy, or one that went postcopy): asking again cannot help.
            raise StepError(
                "recover",
                f"host {self.source}: {exc}",
                vm=self.vm,
                host=self.source,
                retryable=exc.status >= 500,
            ) from exc
        except ClientError as exc:
            raise StepError(
                "recover", f"host {self.source}: {exc}", vm=self.vm, host=self.source
            ) from exc
        if status != "running":
            raise StepError("recover", f"source QEMU is {status}", vm=self.vm)

    async def _remove_for_recovery(self) -> None:
        try:
            await self.ends.destination_raw(lambda c: delete_vm(c, self.vm, self.migration))
        except Conflict as exc:
            again = await self.ends.destination_vm("recover")
            if again is not None and again.state == VmState.RUNNING:
                raise SwitchedOver(f"the destination {self.destination} runs the VM") from exc
            raise StepError(
                "recover",
                f"host {self.destination} refused to remove the destination: {exc}",
                vm=self.vm,
                host=self.destination,
                retryable=False,
            ) from exc
        except ClientError as exc:
            raise StepError(
                "recover", f"host {self.destination}: {exc}", vm=self.vm, host=self.destination
            ) from exc

    async def _may_have_gone_postcopy(self, postcopy_requested: bool) -> bool:
        """Whether this migration may have switched to postcopy (then the source's copy is
        stale): asked for, or in the source's record of QEMU's statuses; unknown counts."""
        if postcopy_requested:
            return True
        try:
            stats = await self.ends.source(
                "recover", lambda c: c.migration(self.vm, migration=self.migration)
            )
        except StepError:
            return True
        return any(s.startswith("postcopy") for s, _ in stats.events)
