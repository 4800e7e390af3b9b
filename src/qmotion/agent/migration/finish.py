"""The destination's Finish step (libvirt's): a destination started paused (``-S``) runs only
on the word that its source completed; the manager then confirms it here, or tears it down.

QEMU that runs the guest by itself when the stream completes cannot be told "not now": its
cancel-at-completion race can leave the source resumed and the destination running. Paused,
the destination loads the stream and waits for the word (``finish``), which the source agent
gives once its QEMU is in ``postmigrate`` (it never resumes by itself) and the manager gives
again. Every call names the migration by its id: the word, the confirmation (``keep_disks``)
and the teardown act only on the VM that arrives by that migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import Conflict
from qmotion.agent.vms.manager import VmManager
from qmotion.agent.vms.migration_record import IncomingRecord
from qmotion.api.vm import VmInfo, VmState
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)
POLL_S = 0.01
# Postcopy: QEMU reports postcopy-active before it has loaded the device state; it leaves
# ``inmigrate`` for ``paused`` once it could run. Waited for this long at most.
LOADED_WAIT_S = 120.0
ANSWER_S = 2.0  # a destination that does not say its run state by then is never deleted
# Run states of a destination whose guest never ran here.
NEVER_RAN = ("inmigrate", "prelaunch", "paused")


async def incoming_status(mon: Monitor) -> str:
    return str((await mon.execute("query-migrate")).get("status", "none"))


class DestinationFinish:
    """The word, the confirmation and the teardown of this host's incoming VMs."""

    def __init__(self, vms: VmManager, incoming_disks: IncomingDisks) -> None:
        self.vms = vms
        self.incoming_disks = incoming_disks
        self._locks: dict[str, asyncio.Lock] = {}
        self._runs: set[asyncio.Task[None]] = set()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _incoming(self, name: str, migration: str) -> IncomingRecord:
        """The VM's incoming record, if it arrives (or arrived, unconfirmed) by ``migration``."""
        self.vms.spec(name)
        rec = self.vms.records.get(name).incoming
        if rec is None or rec.id != migration:
            arrived = "no unconfirmed arrival" if rec is None else f"migration {rec.id}"
            raise Conflict(
                f"VM {name} here is not the destination of migration {migration} ({arrived})",
                vm=name,
            )
        return rec

    async def finish(self, name: str, migration: str, wait_ms: int = 0) -> VmInfo:
        """The word: the destination of ``migration`` runs, now if its stream is loaded, else
        as soon as it is (the word is kept, on disk, for the watcher and a restarted agent).
        Waits up to ``wait_ms`` for it to run; answers the VM either way."""
        self._incoming(name, migration)
        try:
            mon = self.vms.monitor(name)
            # Kept before QEMU is asked: a completion seen meanwhile finds the word.
            self.vms.records.remember_finish(name)
            status = await incoming_status(mon)
        except (Conflict, HypervisorError) as exc:
            raise Conflict(
                f"the incoming migration {migration} of {name} failed here (its QEMU is "
                f"gone: {exc}): nothing to run",
                vm=name,
            ) from exc
        if status in ("failed", "cancelled"):
            raise Conflict(
                f"the incoming migration {migration} of {name} failed here ({status}): "
                "nothing to run",
                vm=name,
            )
        if status == "completed" or status.startswith("postcopy"):
            await self.run(name, mon)
        if wait_ms > 0:
            await self._wait_running(mon, time.monotonic() + wait_ms / 1000)
        return await self.vms.info(name)

    def on_incoming_status(self, name: str, mon: Monitor, status: str) -> None:
        """The incoming watcher saw ``status``: a paused destination runs once its stream is
        loaded if the word came, and in postcopy at once (the source stopped for good: our
        source agent never resumes or cancels a stream in postcopy)."""
        rec = self.vms.records.get(name).incoming
        if rec is None or rec.start != "paused":
            return
        if (status == "completed" and rec.finish) or status == "postcopy-active":
            task = asyncio.create_task(self._run_logged(name, mon), name=f"finish-{name}")
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def _run_logged(self, name: str, mon: Monitor) -> None:
        try:
            await self.run(name, mon)
        except Exception as exc:  # a background task: its failure is logged, never lost
            log.error("could not run the destination %s: %s", name, exc)

    async def run(self, name: str, mon: Monitor) -> None:
        """``cont`` the paused destination, once QEMU left ``inmigrate`` (a ``cont`` there
        would activate the disks the source may still write to)."""
        async with self._lock(name):
            rec = self.vms.records.get(name).incoming
            if rec is None or rec.start != "paused":
                return  # confirmed (it ran), gone, or running by itself
            deadline = time.monotonic() + LOADED_WAIT_S
            state = await mon.status()
            while state in ("inmigrate", "prelaunch") and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                state = await mon.status()
            if state == "paused":
                # Written first: an agent that dies after the cont still knows it ran.
                self.vms.records.mark_ran(name)
                await mon.execute("cont")
                log.info("destination %s runs (migration %s)", name, rec.id)

    async def _wait_running(self, mon: Monitor, deadline: float) -> None:
        with contextlib.suppress(HypervisorError):
            while time.monotonic() < deadline:  # QEMU's run state: no event to wait on here
                if await mon.status() == "running":
                    return
                await asyncio.sleep(POLL_S * 2)

    async def settle_after_restart(self, name: str, mon: Monitor) -> str | None:
        """At agent start: a destination told to run whose stream completed while the agent
        was away runs now (in postcopy too); returns its incoming status (None: no arrival
        waiting for a word here)."""
        rec = self.vms.records.get(name).incoming
        if rec is None or rec.start != "paused":
            return None
        status = await incoming_status(mon)
        if (status == "completed" and rec.finish) or status.startswith("postcopy"):
            log.warning("destination %s was left paused (%s): it runs now", name, status)
            await self.run(name, mon)
        return status

    async def keep_disks(self, name: str, migration: str | None = None) -> None:
        """The manager saw the VM run here: the disks its copy made are simply its own and,
        with ``migration``, that migration is confirmed here (the VM is simply here now)."""
        self.vms.spec(name)
        if migration is not None:
            rec = self.vms.records.get(name).incoming
            if rec is not None and rec.id != migration:
                raise Conflict(
                    f"VM {name} here arrived by migration {rec.id}, not {migration}", vm=name
                )
        await self.incoming_disks.end(name)
        if migration is not None:
            self.vms.records.confirm_incoming(name)

    async def teardown(
        self, name: str, migration: str, *, force: bool = False, with_disks: bool = False
    ) -> None:
        """Delete the destination of a failed ``migration``: never a VM that runs here or
        that did not arrive by it (one that was here before, or arrived by another)."""
        async with self._lock(name):
            rec = self._incoming(name, migration)
            if rec.ran:
                raise Conflict(
                    f"VM {name} ran here after migration {migration}: it may have written "
                    "what the source lacks, so it is never deleted as a failed destination",
                    vm=name,
                )
            if rec.start == "paused":
                # Started with -S and never let run by this agent (it marks the record before
                # its cont): it never ran, whatever its monitor says (a destination whose
                # stream died mid-handshake may not answer at all).
                await self.vms.delete(name, force=force, with_disks=with_disks)
                self._locks.pop(name, None)
                return
            try:
                info = await asyncio.wait_for(self.vms.info(name), ANSWER_S)
            except TimeoutError as exc:
                # A destination in postcopy whose main loop waits on a page runs the guest.
                raise Conflict(
                    f"VM {name} does not say whether it runs (its monitor does not answer): "
                    "never deleted as a failed destination",
                    vm=name,
                ) from exc
            stopped = info.state in (VmState.STOPPED, VmState.SUSPENDED)
            if not stopped and info.qemu_status not in NEVER_RAN:
                raise Conflict(
                    f"VM {name} runs here ({info.qemu_status or info.state}): never deleted "
                    "as a failed destination",
                    vm=name,
                )
            await self.vms.delete(name, force=force, with_disks=with_disks)
        self._locks.pop(name, None)
