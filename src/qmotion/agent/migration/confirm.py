"""The source's Confirm step (libvirt's): after a migration the source's QEMU ends (released:
the guest runs on the destination) or the guest resumes here (the migration failed).

Both are asked for one migration, by the manager's id: QEMU's ``completed`` and its run state
``postmigrate`` say that *a* stream took the guest away, and only the VM's migration record
(``agent.vms.migration_record``) says which. A copy that went away in another migration is a
stale copy: never resumed, never released for this one. Without an id the agent answers as
it did before ids existed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import Conflict, InPostcopy, MigratedAway, StaleCopy
from qmotion.agent.vms.manager import VmManager
from qmotion.hypervisor import process
from qmotion.hypervisor.errors import HypervisorError

# QEMU migration states in which no migration is under way (a source may be resumed).
IDLE_MIGRATION = ("none", "completed", "failed", "cancelled")
# Run states of a QEMU whose guest a stream took (or is taking) away.
LEFT = ("postmigrate", "finish-migrate")


class SourceConfirm:
    """Release or resume this host's copy of a VM after its outgoing migration."""

    def __init__(
        self,
        vms: VmManager,
        nbd: NbdMirrors,
        incoming_disks: IncomingDisks,
        went_postcopy: Callable[[str], bool],
    ) -> None:
        self.vms = vms
        self.nbd = nbd
        self.incoming_disks = incoming_disks
        self._went_postcopy = went_postcopy  # the watcher's view of the stream under way

    def _last_outgoing(self, name: str) -> str:
        out = self.vms.records.get(name).outgoing
        return "an unrecorded one" if out is None else f"{out.id or 'one without an id'}"

    def went_postcopy(self, name: str) -> bool:
        """The last stream from here entered postcopy: this copy lacks what the destination
        wrote since, whichever migration asks (the record keeps it across restarts)."""
        out = self.vms.records.get(name).outgoing
        return self._went_postcopy(name) or (out is not None and out.postcopy)

    async def release(self, name: str, migration: str | None = None) -> None:
        """After a completed migration, end the source's QEMU and forget the VM here.

        Refused unless QEMU says the VM moved away (postmigrate): never end the only copy;
        with ``migration``, unless it moved away in that migration."""
        async with self.vms.locked(name) as spec:
            mon = self.vms.monitor(name)
            qemu_migration = str((await mon.execute("query-migrate")).get("status", "none"))
            if qemu_migration.startswith("postcopy"):
                raise InPostcopy(
                    f"VM {name} is in postcopy ({qemu_migration}): this QEMU still holds pages "
                    "the destination needs; refusing to release it",
                    vm=name,
                )
            status = await mon.status()
            if status != "postmigrate":
                raise Conflict(
                    f"VM {name} is {status} here, not migrated away; refusing to release it",
                    vm=name,
                )
            out = self.vms.records.get(name).outgoing
            if migration is not None and (
                out is None or out.id != migration or qemu_migration != "completed"
            ):
                raise Conflict(
                    f"VM {name} here did not complete migration {migration} (its last "
                    f"outgoing migration is {self._last_outgoing(name)}, {qemu_migration}); "
                    "refusing to release it",
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
        await self.vms.delete(name, force=True)

    async def resume(
        self, name: str, after_failed_switchover: bool = False, migration: str | None = None
    ) -> str:
        """Resume a source left paused by a failed migration; returns QEMU's status.

        A source whose migration completed is resumed only when the manager says the
        destination was removed (``after_failed_switchover``): otherwise two copies would run.
        With ``migration``: a copy that left in another migration is a stale copy (never
        resumed); an arrival's or a restore's ``completed`` (the guest is here, running or
        paused) is no switchover: the guest is resumed as after any rollback."""
        mon = self.vms.monitor(name)
        qemu_migration = str((await mon.execute("query-migrate")).get("status", "none"))
        run_state = await mon.status()
        left = run_state in LEFT or qemu_migration.startswith("postcopy")
        if migration is not None and left:
            out = self.vms.records.get(name).outgoing
            if out is None or out.id != migration:
                raise StaleCopy(
                    f"VM {name} here went away in migration {self._last_outgoing(name)}, not "
                    f"in {migration}: this copy is never resumed",
                    vm=name,
                )
        if qemu_migration.startswith("postcopy"):
            raise InPostcopy(
                f"VM {name} is in postcopy ({qemu_migration}): the destination runs it and "
                "this copy lacks what it has written; it is never resumed here",
                vm=name,
            )
        if self.went_postcopy(name):
            raise MigratedAway(
                f"VM {name} migrated away in postcopy: the destination has written to memory "
                "this copy does not have; it is never resumed here",
                vm=name,
            )
        switched = qemu_migration == "completed" and (migration is None or left)
        if switched and not after_failed_switchover:
            raise MigratedAway(
                f"VM {name} completed its migration away; it runs elsewhere now", vm=name
            )
        if qemu_migration not in IDLE_MIGRATION:
            # Resuming mid-migration could race the switchover into two running copies.
            raise Conflict(
                f"VM {name} is still migrating ({qemu_migration}); cancel it first", vm=name
            )
        if run_state == "finish-migrate":
            raise Conflict(f"VM {name} is still ending its switchover; ask again", vm=name)
        if run_state in ("paused", "postmigrate"):
            # A destination's arrival runs from here on: marked first, as the word marks it
            # (a copy that ran is never torn down as a failed destination).
            self.vms.records.mark_ran(name)
            await mon.execute("cont")
            run_state = await mon.status()
        # It runs here on its own disks: a copy made for a migration that did not happen is
        # void (and its record must not lead a later release to the files).
        await self.nbd.void(name)
        return run_state
