"""Undoing a live migration through its two agents: the rollback before the switchover, and
the recovery on the source after a switchover whose destination does not run.

Both undo only what is proven safe to undo: a destination goes only once the source is
confirmed running, and a source is resumed only if its copy of the VM cannot be stale.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import Leftover, MigrationParams, QemuMigrationStatus
from qmotion.api.vm import VmState
from qmotion.client.errors import ApiError, ClientError
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
IDLE = frozenset(
    {QemuMigrationStatus.NONE, QemuMigrationStatus.FAILED, QemuMigrationStatus.CANCELLED}
)  # no migration under way on the source


class Undo:
    """The undo steps of one migration, through ``ends``; what cannot be undone is recorded
    in the flight record's leftovers. ``clock``: the port's."""

    def __init__(
        self, ends: Ends, disks: SharedNothing, flight: FlightRecorder, clock: Callable[[], float]
    ) -> None:
        self.ends, self.disks, self.flight, self._clock = ends, disks, flight, clock
        self.vm, self.source, self.destination = ends.vm, ends.src.name, ends.dst.name

    async def rollback(
        self,
        cancel_migration: bool,
        teardown_destination: bool,
        stop_mirror: bool,
        *,
        postcopy_requested: bool,
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
        try:
            if cancel_migration:
                await self._cancel_on_source()
            if stop_mirror:
                await self.disks.stop()
            status = await self._resume_source()
        except StepError as exc:
            await self._forward_if_destination_runs(postcopy_requested)
            if teardown_destination:
                self._keep_destination(f"the source could not be confirmed running ({exc})")
            raise
        if status != "running":
            await self._forward_if_destination_runs(postcopy_requested)
            if teardown_destination:
                self._keep_destination(f"the source QEMU is {status}, not running")
            raise StepError("rollback", f"source QEMU is {status} after rollback", vm=self.vm)
        if cancel_migration or self.flight.issued_at is not None:
            # The source's stop may already have steered the network away: win it back.
            with contextlib.suppress(StepError):
                await self.ends.source("rollback", lambda c: c.announce(self.vm))
        if teardown_destination:
            try:
                await self.ends.destination("rollback", lambda c: delete_vm(c, self.vm))
            except StepError as exc:
                # The source runs, so whatever is left there is not the VM; report it.
                self._keep_destination(f"it could not be removed ({exc})")
                raise

    async def _cancel_on_source(self) -> None:
        """QEMU's migrate_cancel, then wait until the source's migration has settled."""
        before = await self.ends.source("rollback", lambda c: c.migration(self.vm))
        if before.status == QemuMigrationStatus.COMPLETED:
            raise SwitchedOver("the source reports the migration completed")
        if before.status in POSTCOPY:
            raise InPostcopy("the migration is in postcopy: the destination runs the VM")
        deadline = self._clock() + SWITCHOVER_WAIT_S
        while before.status in SWITCHING and self._clock() < deadline:
            # Mid-switchover the network is being steered to the destination: cancelling now
            # would leave it pointing there; the switchover ends in moments either way.
            await asyncio.sleep(0.05)
            before = await self.ends.source("rollback", lambda c: c.migration(self.vm))
            if before.status == QemuMigrationStatus.COMPLETED:
                raise SwitchedOver("the migration completed during the switchover")
        if before.status not in IDLE:
            try:
                await self.ends.source("rollback", lambda c: c.cancel_migration(self.vm))
            except StepError as exc:
                # Refused (the switch to postcopy came first) or lost: what QEMU says decides.
                now = await self.ends.source("rollback", lambda c: c.migration(self.vm))
                if now.status in POSTCOPY:
                    raise InPostcopy("the migration went into postcopy before the cancel") from exc
                raise
        deadline = self._clock() + SETTLE_TIMEOUT_S
        again_at = self._clock() + RECANCEL_S
        while True:
            stats = await self.ends.source("rollback", lambda c: c.migration(self.vm))
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
                await self.ends.source("rollback", lambda c: c.cancel_migration(self.vm))
            if self._clock() > deadline:
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
            return await self.ends.source_raw(lambda c: c.resume(self.vm))
        except ApiError as exc:
            if exc.detail.code == AgentErrorCode.IN_POSTCOPY:
                raise InPostcopy(str(exc)) from exc
            if exc.detail.code == AgentErrorCode.MIGRATED_AWAY:
                raise SwitchedOver(str(exc)) from exc
            raise StepError("rollback", f"host {self.source}: {exc}", vm=self.vm) from exc
        except ClientError as exc:
            raise StepError(
                "rollback", f"host {self.source}: {exc}", vm=self.vm, host=self.source
            ) from exc

    async def _forward_if_destination_runs(self, postcopy_requested: bool) -> None:
        """A running destination QEMU proves the switchover: it only runs once it received
        the whole state, after which the source never resumes on its own."""
        with contextlib.suppress(StepError):
            info = await self.ends.destination("rollback", lambda c: c.vm(self.vm))
            if info.state == VmState.RUNNING and postcopy_requested:
                # It runs from the moment postcopy starts, with pages still on the source.
                raise InPostcopy(f"the destination {self.destination} runs the VM in postcopy")
            if info.state == VmState.RUNNING:
                raise SwitchedOver(f"the destination {self.destination} runs the VM")

    def _keep_destination(self, why: str) -> None:
        self.flight.leftovers.append(
            Leftover(
                host=self.destination,
                vm=self.vm,
                what="destination QEMU (incoming migration) not removed",
                why=why,
            )
        )

    async def recover(self, params: MigrationParams, *, postcopy_requested: bool) -> None:
        """After switchover the destination does not run: remove it, then resume the source.

        If the destination cannot be reached its QEMU might still run; resuming the source
        then risks two copies, so that is refused and left to the operator. A migration that
        could have gone postcopy (a short postcopy can complete between two polls) is never
        recovered on the source: the destination may have written what the source lacks.
        """
        if params.postcopy and await self._may_have_gone_postcopy(postcopy_requested):
            raise StepError(
                "recover",
                "postcopy was allowed: the source's copy may be stale, so it is not resumed "
                "and the destination is kept",
                vm=self.vm,
                retryable=False,
            )
        await self.ends.destination("recover", lambda c: delete_vm(c, self.vm))
        if params.copy_datastore is not None:
            await self.disks.stop()
        status = await self.ends.source(
            "recover", lambda c: c.resume(self.vm, after_failed_switchover=True)
        )
        if status != "running":
            raise StepError("recover", f"source QEMU is {status}", vm=self.vm)

    async def _may_have_gone_postcopy(self, postcopy_requested: bool) -> bool:
        """Whether this migration may have switched to postcopy (then the source's copy is
        stale): asked for, or in the source's record of QEMU's statuses; unknown counts."""
        if postcopy_requested:
            return True
        try:
            stats = await self.ends.source("recover", lambda c: c.migration(self.vm))
        except StepError:
            return True
        return any(s.startswith("postcopy") for s, _ in stats.events)
