"""Storage vMotion on one host: mirror a running VM's disks to another datastore, pivot all
of them together or none, remove the old files only after the pivot.

How QEMU is driven (QEMU 10.0, ``blockdev-mirror``), and why:

- every target is a fresh image (``qemu-img create``) so it reads as zeros: the mirror skips
  what the source has not allocated and a sparse disk stays sparse;
- jobs start in ``background`` copy mode (guest writes complete at the source's speed) and are
  switched to ``write-blocking`` (``block-job-change``) when the manager asks: once in sync,
  or earlier when the guest writes faster than the copy. In write-blocking mode a guest write
  completes only once both copies have it, so the mirror converges under any write load;
- ``auto-finalize: false``: ``job-complete`` brings each job to ``pending`` (its last sync
  done, the source drained, nothing switched yet); only when every job is pending is each one
  finalized, which is when QEMU points the disk at its target. A job that fails before that
  makes every job cancelled instead: all disks pivot or none does;
- what the move is doing is written to the VM's directory (``storage-move.json``) before each
  change, so an agent restarted midway still knows which files are targets to remove; the
  phase ``switching`` is written before the first finalize, and until QEMU has been asked
  which disks it runs on, nothing is removed;
- no file QEMU has open is ever deleted, whatever the record says;
- while a move is unresolved the VM is not live-migrated, deleted (without force) or started
  from a definition that may name the wrong copy.

``StorageMoves`` here runs each step under the VM's lock; the record and the files it names are
kept by ``storage_record``, the jobs' ending (pivot, settle, cancel) is done by ``storage_pivot``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
import time
from typing import Any

from qmotion.agent.config import DatastoreConfig
from qmotion.agent.disks.datastores import (
    SPACE_MARGIN,
    datastore,
    free_bytes,
    free_name,
    image_info,
)
from qmotion.agent.disks.storage_pivot import Pivots
from qmotion.agent.disks.storage_record import MovedDisk, MoveRecord, MoveRecords
from qmotion.agent.errors import (
    AgentError,
    AlreadySwitched,
    Conflict,
    OperationFailed,
    SpecRejected,
)
from qmotion.agent.vms.manager import VmManager
from qmotion.api.storage import DiskMirror, DiskUsage, MirrorRequest, MirrorStatus
from qmotion.api.vm import Disk
from qmotion.hypervisor.blockjobs import mirror_jobs, source_nodes, write_blocking
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)
MIRROR_BUF_BYTES = 64 << 20

JOB_PREFIX = "qm-mirror-"


class StorageMoves:
    def __init__(self, vms: VmManager) -> None:
        self.vms = vms
        self.records = MoveRecords(vms)
        self.pivots = Pivots(vms, self.records)
        vms.storage_guard = self.records.unresolved
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, tuple[float, int]] = {}  # name -> (time, bytes copied) for rates

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------------ disks

    async def disks(self, name: str) -> list[DiskUsage]:
        """Each disk with its size as the guest sees it and what the file occupies."""
        spec = self.vms.spec(name)
        out = []
        for i, disk in enumerate(spec.disks):
            size = allocated = None
            with contextlib.suppress(OperationFailed, SpecRejected, OSError, ValueError):
                info = await image_info(self.records.disk_path(disk, name))
                size, allocated = int(info["virtual-size"]), int(info["actual-size"])
            out.append(
                DiskUsage(
                    index=i,
                    datastore=disk.datastore,
                    path=disk.path,
                    format=disk.format,
                    virtual_size=size,
                    allocated_bytes=allocated,
                )
            )
        return out

    # ------------------------------------------------------------------ start

    async def check(self, name: str, req: MirrorRequest) -> MirrorStatus:
        """What ``start`` would refuse (the manager asks at submission, so a refusal is an
        HTTP error there, not a failed task). Changes nothing, except that the leftovers of
        an earlier move that failed (never switched) are cleared first, as ``start`` does."""
        async with self._lock(name):
            await self._checked(name, req)
        return MirrorStatus(vm=name, phase="aborted", datastore=req.datastore)

    async def _checked(
        self, name: str, req: MirrorRequest
    ) -> tuple[Monitor, DatastoreConfig, list[tuple[int, Disk]], list[tuple[int, int]]]:
        spec = self.vms.spec(name)
        mon = self.vms.monitor(name)  # refuses a VM that is not running
        rec = self.records.load(name)
        if rec is not None and rec.phase == "failed":
            await self._abort(name, rec)  # an earlier move's leftovers (never switched)
        if (reason := self.records.unresolved(name)) is not None:
            raise Conflict(f"VM {name} cannot start a storage move: {reason}", vm=name)
        ds = datastore(self.vms.config, req.datastore, name)
        moving = [(i, d) for i, d in enumerate(spec.disks) if d.datastore != req.datastore]
        if not spec.disks:
            raise Conflict(f"VM {name} has no disks to move", vm=name, field="datastore")
        if not moving:
            raise Conflict(
                f"every disk of {name} is already on datastore {req.datastore}",
                vm=name,
                field="datastore",
            )
        sizes = []
        for _, disk in moving:
            info = await image_info(self.records.disk_path(disk, name))
            sizes.append((int(info["virtual-size"]), int(info["actual-size"])))
        need = int(sum(a for _, a in sizes) * SPACE_MARGIN)
        have = await asyncio.to_thread(free_bytes, ds.path)
        if have < need:
            raise SpecRejected(
                f"datastore {req.datastore} has {have >> 20} MiB free on host "
                f"{self.vms.config.name}; the disks of {name} occupy {need >> 20} MiB",
                vm=name,
                field="datastore",
            )
        return mon, ds, moving, sizes

    async def start(self, name: str, req: MirrorRequest) -> MirrorStatus:
        async with self._lock(name):
            mon, ds, moving, sizes = await self._checked(name, req)
            nodes = await source_nodes(mon)
            gen = secrets.token_hex(2)
            rec = MoveRecord(datastore=req.datastore, phase="mirroring", disks=[])
            for i, disk in moving:
                fmt = req.format or disk.format
                target = Disk(
                    datastore=req.datastore,
                    path=free_name(ds, name, i, fmt),
                    format=fmt,
                    bootable=disk.bootable,
                )
                node, file_node = nodes.get(i, (f"disk{i}", f"file{i}"))
                rec.disks.append(
                    MovedDisk(
                        index=i,
                        job=f"{JOB_PREFIX}{i}",
                        source=disk,
                        target=target,
                        source_node=node,
                        source_file_node=file_node,
                        target_node=f"m{gen}d{i}",
                        target_file_node=f"m{gen}f{i}",
                    )
                )
            # Recorded before any file exists: an agent that dies from here on knows what
            # to remove.
            self.records.save(name, rec)
            try:
                for moved, (size, _) in zip(rec.disks, sizes, strict=True):
                    await self._create_target(name, ds, moved, size)
                    # The pivot reopens cached only the targets opened direct: known even to
                    # an agent restarted from here on.
                    self.records.save(name, rec)
                    await mon.execute(
                        "blockdev-mirror",
                        {
                            "job-id": moved.job,
                            "device": moved.source_node,
                            "target": moved.target_node,
                            "sync": "full",
                            "copy-mode": "background",
                            # QEMU copies at most buf-size/16 (min 1 MiB) per request, 16 in
                            # flight: 64 MiB makes 4 MiB requests, near qemu-img convert's rate.
                            "buf-size": MIRROR_BUF_BYTES,
                            "speed": req.speed or 0,
                            "auto-finalize": False,
                            "auto-dismiss": False,
                        },
                    )
            except (HypervisorError, AgentError) as exc:
                rec.error = f"starting the mirror failed: {exc}"
                await self._abort(name, rec)
                raise OperationFailed(
                    f"storage move of {name} to {req.datastore} did not start: {exc}; "
                    "the VM runs on its old disks and the new files were removed",
                    vm=name,
                ) from exc
            self._last[name] = (time.monotonic(), 0)
            return await self._status(name, rec)

    async def _create_target(
        self, name: str, ds: DatastoreConfig, moved: MovedDisk, size: int
    ) -> None:
        path = ds.path / moved.target.path
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", moved.target.format, str(path), str(size)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise OperationFailed(f"creating {path} failed: {proc.stderr.strip()}", vm=name)
        await asyncio.to_thread(self.vms.access.disk, path)
        mon = self.vms.monitor(name)
        file_node = {"driver": "file", "filename": str(path), "node-name": moved.target_file_node}
        try:
            # Written past the page cache: through it the copy ran at 0.55-0.85x qemu-img
            # convert, varying with the host's write-back (1.0-1.9 s for 1 GiB); direct, a
            # steady 1.06-1.17 s. The pivot reopens it as the VM's disks are (cached).
            await mon.execute("blockdev-add", file_node | {"cache": {"direct": True}})
            moved.direct = True
        except QmpError as exc:
            # A file system without O_DIRECT (tmpfs): through the page cache then.
            log.info(
                "%s: no direct I/O on %s (%s): the copy goes through the page cache",
                name,
                path,
                exc,
            )
            await mon.execute("blockdev-add", file_node | {"cache": {"direct": False}})
        await mon.execute(
            "blockdev-add",
            {
                "driver": moved.target.format,
                "file": moved.target_file_node,
                "node-name": moved.target_node,
            },
        )

    # ------------------------------------------------------------------ status

    async def status(self, name: str) -> MirrorStatus:
        async with self._lock(name):
            self.vms.spec(name)
            rec = self.records.load(name)
            if rec is None:
                raise Conflict(f"VM {name} has no storage move", vm=name)
            if rec.phase == "switching":
                await self.pivots.settle(name, rec)
            return await self._status(name, rec)

    async def _jobs(self, name: str) -> dict[str, dict[str, Any]]:
        return await mirror_jobs(self.vms.monitor(name), JOB_PREFIX)

    async def _status(self, name: str, rec: MoveRecord) -> MirrorStatus:
        jobs: dict[str, dict[str, Any]] = {}
        if rec.phase in ("mirroring", "ready", "failed"):
            try:
                jobs = await self._jobs(name)
            except QmpError as exc:
                # QEMU answered with an error: a hiccup, not a verdict on the move.
                raise OperationFailed(f"querying the mirror of {name}: {exc}", vm=name) from exc
            except (HypervisorError, Conflict) as exc:
                # Not running, or its monitor is gone: the jobs are gone with QEMU.
                rec.phase, rec.error = "failed", f"the VM's QEMU is gone: {exc}"
        disks = []
        for d in rec.disks:
            j = jobs.get(d.job, {})
            gone = "concluded" if rec.phase in ("pivoted", "released", "switching") else "gone"
            status = str(j.get("status") or gone)
            error = j.get("error")
            if rec.phase in ("mirroring", "ready") and (error or status == "gone"):
                rec.phase = "failed"
                rec.error = f"disk {d.index}: {error or 'its mirror job is gone'}"
            disks.append(
                DiskMirror(
                    index=d.index,
                    job=d.job,
                    source=d.source,
                    target=d.target,
                    status=status,
                    offset=int(j.get("offset", 0)),
                    length=int(j.get("len", 0)),
                    ready=bool(j.get("ready", rec.phase in ("pivoted", "released"))),
                    actively_synced=bool(j.get("actively_synced")),
                    error=str(error) if error else None,
                )
            )
        if rec.phase == "mirroring" and disks and all(d.ready for d in disks):
            rec.phase = "ready"
        self.records.save(name, rec)
        total = sum(d.length for d in disks)
        copied = sum(d.offset for d in disks)
        now = time.monotonic()
        t0, c0 = self._last.get(name, (now, copied))
        rate = (copied - c0) / (now - t0) if now > t0 and copied >= c0 else 0.0
        self._last[name] = (now, copied)
        return MirrorStatus(
            vm=name,
            phase=rec.phase,
            datastore=rec.datastore,
            copy_mode=rec.copy_mode,
            disks=disks,
            total_bytes=total,
            remaining_bytes=max(0, total - copied),
            rate_bps=rate,
            error=rec.error,
        )

    # ------------------------------------------------------------------ active mode

    async def activate(self, name: str) -> MirrorStatus:
        """Guest writes reach both copies before they complete, from now on."""
        async with self._lock(name):
            rec = self._require(name, ("mirroring", "ready"))
            mon = self.vms.monitor(name)
            try:
                await write_blocking(mon, name, [(d.index, d.job) for d in rec.disks])
            except HypervisorError as exc:
                raise OperationFailed.of(exc, vm=name) from exc
            rec.copy_mode = "write-blocking"
            self.records.save(name, rec)
            return await self._status(name, rec)

    def _require(self, name: str, phases: tuple[str, ...]) -> MoveRecord:
        self.vms.spec(name)
        rec = self.records.load(name)
        if rec is None:
            raise Conflict(f"VM {name} has no storage move", vm=name)
        if rec.phase not in phases:
            raise Conflict(f"the storage move of {name} is {rec.phase}", vm=name)
        return rec

    # ------------------------------------------------------------------ pivot

    async def pivot(self, name: str) -> MirrorStatus:
        """Point every disk at its target, or none. Refused (409) unless every job is ready."""
        async with self._lock(name):
            rec = self._require(name, ("mirroring", "ready", "switching"))
            if rec.phase == "switching":  # an earlier pivot's answer was lost
                await self.pivots.settle(name, rec)
                if str(rec.phase) != "pivoted" or rec.error:
                    raise OperationFailed(
                        f"pivot of {name}: {rec.error or rec.phase}; see the move's status",
                        vm=name,
                    )
                return await self._status(name, rec)
            mon = self.vms.monitor(name)
            jobs = await self._jobs(name)
            unready = [d.index for d in rec.disks if not jobs.get(d.job, {}).get("ready")]
            if unready:
                raise Conflict(
                    f"disks {unready} of {name} are not in sync yet; nothing was switched",
                    vm=name,
                )
            await self.pivots.switch(name, mon, rec)
            if str(rec.phase) != "pivoted" or rec.error:
                raise OperationFailed(
                    f"pivot of {name}: {rec.error or rec.phase}; see the move's status", vm=name
                )
            return await self._status(name, rec)

    # ------------------------------------------------------------------ release / abort

    async def release(self, name: str) -> MirrorStatus:
        """After the pivot: remove the old files, and the targets of disks that did not
        switch. A file QEMU has open is kept and named. Idempotent."""
        async with self._lock(name):
            self.vms.spec(name)
            rec = self.records.load(name)
            if rec is None:  # released before; its answer was lost
                return MirrorStatus(vm=name, phase="released", datastore="")
            if rec.phase == "switching":
                await self.pivots.settle(name, rec)
            if rec.phase not in ("pivoted", "released"):
                raise Conflict(f"the storage move of {name} is {rec.phase}", vm=name)
            mon: Monitor | None
            try:
                mon = self.vms.monitor(name)
            except Conflict:
                mon = None
            for d in rec.disks:
                if not d.switched and mon is not None:
                    for node in (d.target_node, d.target_file_node):
                        with contextlib.suppress(HypervisorError):
                            await mon.execute("blockdev-del", {"node-name": node})
            open_files = await self.records.open_files(name)
            removed, leftovers = [], []
            for d in rec.disks:
                got, left = await self.records.unlink(
                    name, d.source if d.switched else d.target, open_files
                )
                removed += [got] if got else []
                leftovers += [left] if left else []
            rec.phase = "released"
            status = await self._status(name, rec)
            self.records.save(name, None)
            self._last.pop(name, None)
            return status.model_copy(update={"removed": removed, "leftovers": leftovers})

    async def abort(self, name: str) -> MirrorStatus:
        """Cancel the mirror: the VM stays on its old disks, the new files are removed.

        Idempotent; refused (``already_switched``) once a disk switched: then only
        ``release`` is right."""
        async with self._lock(name):
            self.vms.spec(name)
            rec = self.records.load(name)
            if rec is None:
                return MirrorStatus(vm=name, phase="aborted", datastore="")
            if rec.phase == "switching":
                await self.pivots.settle(name, rec)
            if rec.phase == "switching":
                raise Conflict(
                    f"whether the disks of {name} switched is unknown: both copies kept",
                    vm=name,
                )
            if rec.phase in ("pivoted", "released"):
                raise AlreadySwitched(
                    f"the disks of {name} were already switched to {rec.datastore}", vm=name
                )
            return await self._abort(name, rec)

    async def _abort(self, name: str, rec: MoveRecord) -> MirrorStatus:
        mon: Monitor | None
        try:
            mon = self.vms.monitor(name)
        except Conflict:
            mon = None  # QEMU is gone: only files are left to remove
        if mon is not None:
            if not await self.pivots.cancel_jobs(mon, rec):
                rec.phase = "failed"
                rec.error = rec.error or "the mirror jobs did not end"
                self.records.save(name, rec)
                raise OperationFailed(
                    f"the mirror jobs of {name} did not end; its new files are kept", vm=name
                )
            for d in rec.disks:
                for node in (d.target_node, d.target_file_node):
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("blockdev-del", {"node-name": node})
        spec = self.vms.spec(name)
        in_use = {(disk.datastore, disk.path) for disk in spec.disks}
        open_files = await self.records.open_files(name)
        removed, leftovers = [], []
        for d in rec.disks:
            if (d.target.datastore, d.target.path) in in_use:
                continue  # never delete what the definition runs on
            got, left = await self.records.unlink(name, d.target, open_files)
            removed += [got] if got else []
            leftovers += [left] if left else []
        error = rec.error
        self.records.save(name, None)
        self._last.pop(name, None)
        return MirrorStatus(
            vm=name,
            phase="aborted",
            datastore=rec.datastore,
            copy_mode=rec.copy_mode,
            error=error,
            removed=removed,
            leftovers=leftovers,
        )
