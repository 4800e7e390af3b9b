"""How a storage move's mirror jobs end in QEMU: every disk pivots or none does, and QEMU's own
answer decides which disks run on their targets (the sequence, and why, is in the docstring of
``qmotion.agent.disks.storage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from qmotion.agent.disks.storage_record import MovedDisk, MoveRecord, MoveRecords
from qmotion.agent.errors import Conflict, OperationFailed
from qmotion.agent.vms.manager import VmManager
from qmotion.api.vm import Disk
from qmotion.hypervisor.blockjobs import source_nodes
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)

FLUSH_WAIT_S = 10.0  # the agent's own flush before QEMU's, at most
PENDING_WAIT_S = 10.0  # a job's final sync after job-complete; the guest's I/O waits meanwhile


class Pivots:
    """Ends the mirror jobs of the moves on this host: switched together, or cancelled."""

    def __init__(self, vms: VmManager, records: MoveRecords) -> None:
        self.vms = vms
        self.records = records

    async def switch(self, name: str, mon: Monitor, rec: MoveRecord) -> None:
        """Every job (all ready) to pending, then each finalized; the record then says what
        QEMU runs on (``pivoted``, or ``failed`` with nothing switched)."""
        # The targets' data on disk before QEMU's own flushes, which it does with the
        # guest's disk I/O held (the reopen below; job-complete to finalize): they then have
        # little left to write.
        await self._flush([d.target for d in rec.disks])
        await self._cached(name, mon, rec)
        try:
            for d in rec.disks:
                await mon.execute("job-complete", {"id": d.job})
            await self._wait_all(mon, rec, ("pending",))
        except (HypervisorError, OperationFailed) as exc:
            rec.phase, rec.error = "failed", f"pivot refused, nothing switched: {exc}"
            self.records.save(name, rec)
            await self.cancel_jobs(mon, rec)
            raise OperationFailed(
                f"the disks of {name} could not all be switched, so none was: {exc}",
                vm=name,
            ) from exc
        # From the first finalize on, QEMU may run on a target: recorded before it.
        rec.phase = "switching"
        self.records.save(name, rec)
        errors = []
        for d in rec.disks:
            try:
                await mon.execute("job-finalize", {"id": d.job})
            except HypervisorError as exc:
                errors.append(f"disk {d.index}: {exc}")
        await self.settle(name, rec, "; ".join(errors) or None)

    async def _cached(self, name: str, mon: Monitor, rec: MoveRecord) -> None:
        """The targets copied to past the page cache (``Storage._create_target``), reopened
        as every disk of a VM is opened (through it) before the VM runs on them: one reopen,
        so QEMU drains the guest's disk I/O once."""
        nodes = [
            {
                "driver": "file",
                "node-name": d.target_file_node,
                "filename": str(self.records.disk_path(d.target, name)),
                "cache": {"direct": False},
            }
            for d in rec.disks
            if d.direct
        ]
        if not nodes:
            return
        try:
            await mon.execute("blockdev-reopen", {"options": nodes})
        except HypervisorError as exc:
            # Still correct, only another cache mode until the VM's next start.
            log.warning("%s: the new disks stay on direct I/O: %s", name, exc)

    async def settle(self, name: str, rec: MoveRecord, error: str | None = None) -> None:
        """A ``switching`` record made true: QEMU's answer of which disks run on their
        targets decides. QEMU not answering leaves it ``switching`` (both copies kept)."""
        try:
            mon = self.vms.monitor(name)
            nodes = await source_nodes(mon)
        except (HypervisorError, Conflict) as exc:
            rec.error = f"whether the disks switched is unknown (QEMU: {exc}); both copies kept"
            self.records.save(name, rec)
            return
        rec.error = None  # QEMU answers: what follows is the truth
        for d in rec.disks:
            d.switched = nodes.get(d.index, ("",))[0] == d.target_node
        if any(d.switched for d in rec.disks) and not all(d.switched for d in rec.disks):
            # Interrupted between two finalizes (an agent restart): every job was pending,
            # so finalizing the rest keeps "all or none".
            with contextlib.suppress(HypervisorError):
                pending = {
                    j["id"] for j in await mon.execute("query-jobs") if j.get("status") == "pending"
                }
                for d in rec.disks:
                    if not d.switched and d.job in pending:
                        with contextlib.suppress(HypervisorError):
                            await mon.execute("job-finalize", {"id": d.job})
                nodes = await source_nodes(mon)
                for d in rec.disks:
                    d.switched = nodes.get(d.index, ("",))[0] == d.target_node
        switched = [d for d in rec.disks if d.switched]
        if switched:
            await self._adopt(name, switched)
        if not switched:
            # Nothing switched (the finalizes failed, or an agent restart came first): the
            # jobs end without switching, the VM stays on its old disks.
            await self.cancel_jobs(mon, rec)
            rec.phase = "failed"
            rec.error = error or "the pivot was interrupted; nothing switched"
            self.records.save(name, rec)
            return
        # A job that did not switch is cancelled (a pending one cannot be dismissed).
        await self.cancel_jobs(mon, rec)
        rec.phase = "pivoted"
        if len(switched) != len(rec.disks):
            # All were pending, then QEMU refused a finalize: the truth is a split VM. Its
            # definition names what QEMU runs on; the targets that did not switch go at release.
            stay = [d.index for d in rec.disks if not d.switched]
            rec.error = f"disks {stay} did not switch ({error or 'QEMU refused'}); they stay"
        self.records.save(name, rec)
        # Closing a node flushes it in QEMU's main loop, which then serves neither the
        # guest's network nor its vCPUs' device accesses (the 144 ms gap of a same-host
        # move): flushed here first, from a thread, that flush finds nothing to write.
        await self._flush([d.source for d in switched])
        for d in switched:
            # The old nodes stay open (monitor-owned) until deleted; their files go later.
            for node in (d.source_node, d.source_file_node):
                if node:
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("blockdev-del", {"node-name": node})

    async def _flush(self, disks: list[Disk]) -> None:
        """``_sync`` in a thread, for at most FLUSH_WAIT_S: a store that hangs (NFS) must not
        hold the switch; QEMU flushes anyway (the thread finishes in the background)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self._sync, disks), FLUSH_WAIT_S)

    def _sync(self, disks: list[Disk]) -> None:
        """fdatasync of each disk's file; one that cannot be opened is left to QEMU."""
        for disk in disks:
            ds = self.vms.config.datastore(disk.datastore)
            if ds is None:
                continue
            try:
                fd = os.open(ds.path / disk.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    async def _adopt(self, name: str, switched: list[MovedDisk]) -> None:
        """The definition names the new disks: a restart of this VM uses them."""
        async with self.vms.locked(name) as spec:
            disks = list(spec.disks)
            for d in switched:
                disks[d.index] = d.target
            self.vms.replace_spec(spec.model_copy(update={"disks": disks}))

    async def _wait_all(self, mon: Monitor, rec: MoveRecord, wanted: tuple[str, ...]) -> None:
        deadline = time.monotonic() + PENDING_WAIT_S
        ids = {d.job for d in rec.disks}
        while True:
            states = {j["id"]: j for j in await mon.execute("query-jobs") if j.get("id") in ids}
            for job_id in ids:
                j = states.get(job_id)
                if j is None:
                    raise OperationFailed(f"mirror job {job_id} is gone")
                if j.get("error"):
                    raise OperationFailed(f"mirror job {job_id} failed: {j['error']}")
            if all(states[i].get("status") in wanted for i in ids):
                return
            if time.monotonic() > deadline:
                raise OperationFailed(f"mirror jobs did not reach {wanted[0]} in time")
            await asyncio.sleep(0.05)

    async def cancel_jobs(self, mon: Monitor, rec: MoveRecord) -> bool:
        """Every job ends without switching anything (a pending job cancelled is aborted).
        False if some job did not end in time (or QEMU stopped answering)."""
        ids = {d.job for d in rec.disks}
        with contextlib.suppress(HypervisorError):
            for j in await mon.execute("query-jobs"):
                if j.get("id") in ids and j.get("status") != "concluded":
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("job-cancel", {"id": j["id"]})
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            try:
                left = [
                    j
                    for j in await mon.execute("query-jobs")
                    if j.get("id") in ids and j.get("status") != "concluded"
                ]
            except HypervisorError:
                return False
            if not left:
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        await self._dismiss(mon, rec)
        return True

    @staticmethod
    async def _dismiss(mon: Monitor, rec: MoveRecord) -> None:
        for d in rec.disks:
            with contextlib.suppress(HypervisorError):
                await mon.execute("job-dismiss", {"id": d.job})
