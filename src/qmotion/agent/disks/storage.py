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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qmotion.agent.config import DatastoreConfig
from qmotion.agent.errors import (
    AgentError,
    AlreadySwitched,
    Conflict,
    OperationFailed,
    SpecRejected,
)
from qmotion.agent.vms.manager import VmManager
from qmotion.api.storage import (
    CopyMode,
    DiskMirror,
    DiskUsage,
    MirrorPhase,
    MirrorRequest,
    MirrorStatus,
)
from qmotion.api.vm import Disk
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)

RECORD = "storage-move.json"
PENDING_WAIT_S = 10.0  # a job's final sync after job-complete; the guest's I/O waits meanwhile
SPACE_MARGIN = 1.05  # qcow2 metadata and the writes made while copying
JOB_PREFIX = "qm-mirror-"


class MovedDisk(BaseModel):
    index: int
    job: str
    source: Disk
    target: Disk
    source_node: str
    source_file_node: str | None = None
    target_node: str
    target_file_node: str
    switched: bool = False


class MoveRecord(BaseModel):
    """What the agent persists of one VM's move (see the module docstring)."""

    datastore: str
    phase: MirrorPhase
    copy_mode: CopyMode = "background"
    disks: list[MovedDisk]
    error: str | None = None


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, also while QEMU has it open (``-U``: no lock taken)."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise OperationFailed(f"qemu-img info {path}: {proc.stderr.strip()}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def source_nodes(mon: Monitor) -> dict[int, tuple[str, str | None]]:
    """Disk index -> (format node, file node) the guest's device uses now (a disk moved
    before runs on nodes with other names than the command line gave)."""
    out: dict[int, tuple[str, str | None]] = {}
    for dev in await mon.execute("query-block"):
        qdev = str(dev.get("qdev", ""))
        inserted = dev.get("inserted") or {}
        if not qdev.startswith("/machine/peripheral/vblk") or "node-name" not in inserted:
            continue
        index = int(qdev.removeprefix("/machine/peripheral/vblk").split("/")[0])
        image = inserted.get("image") or {}
        file_node = None
        for n in await mon.execute("query-named-block-nodes", {"flat": True}):
            if (
                n.get("node-name") != inserted["node-name"]
                and n.get("file") == image.get("filename")
                and n.get("drv") == "file"
            ):
                file_node = str(n["node-name"])
        out[index] = (str(inserted["node-name"]), file_node)
    return out


async def mirror_jobs(mon: Monitor, prefix: str) -> dict[str, dict[str, Any]]:
    """QEMU's view of the mirror jobs whose ids start with ``prefix``: query-jobs (status,
    error) merged with query-block-jobs (ready, actively-synced, offset, len)."""
    jobs: dict[str, dict[str, Any]] = {}
    for j in await mon.execute("query-jobs"):
        if str(j.get("id", "")).startswith(prefix):
            jobs[j["id"]] = {
                "status": j.get("status"),
                "error": j.get("error"),
                "offset": j.get("current-progress", 0),
                "len": j.get("total-progress", 0),
            }
    for j in await mon.execute("query-block-jobs"):
        if j.get("device") in jobs:
            jobs[j["device"]].update(
                ready=bool(j.get("ready")),
                actively_synced=bool(j.get("actively-synced")),
                offset=j.get("offset", 0),
                len=j.get("len", 0),
            )
    return jobs


async def write_blocking(mon: Monitor, name: str, jobs: list[tuple[int, str]]) -> None:
    """Each mirror job (disk index, job id) switched to write-blocking: from then on a guest
    write completes only once both copies have it."""
    for index, job in jobs:
        try:
            await mon.execute(
                "block-job-change", {"id": job, "type": "mirror", "copy-mode": "write-blocking"}
            )
        except HypervisorError as exc:
            raise OperationFailed(
                f"switching the mirror of disk {index} of {name} to write-blocking failed: {exc}",
                vm=name,
            ) from exc


class StorageMoves:
    def __init__(self, vms: VmManager) -> None:
        self.vms = vms
        vms.storage_guard = self.unresolved
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, tuple[float, int]] = {}  # name -> (time, bytes copied) for rates

    # ------------------------------------------------------------------ record

    def _record_path(self, name: str) -> Path:
        return self.vms._dir(name) / RECORD

    def _load(self, name: str) -> MoveRecord | None:
        path = self._record_path(name)
        if not path.is_file():
            return None
        return MoveRecord.model_validate_json(path.read_text())

    def _save(self, name: str, rec: MoveRecord | None) -> None:
        path = self._record_path(name)
        if rec is None:
            path.unlink(missing_ok=True)
        else:
            self.vms._write(path, rec.model_dump_json(indent=2))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def unresolved(self, name: str) -> str | None:
        """Why the VM must not be migrated, deleted or restarted now (None: nothing pending)."""
        try:
            rec = self._load(name)
        except (OSError, ValueError):
            return "its storage move record is unreadable"
        if rec is None or rec.phase in ("released", "aborted"):
            return None
        return f"its storage move to {rec.datastore} is {rec.phase}"

    async def _open_files(self, name: str) -> set[str] | None:
        """Every file the VM's QEMU has open; None when QEMU does not answer (then nothing
        may be deleted: any file could be in use)."""
        try:
            nodes = await self.vms.monitor(name).execute("query-named-block-nodes", {"flat": True})
        except Conflict:
            return set()  # not running: QEMU holds nothing
        except HypervisorError:
            return None
        return {str(n.get("file")) for n in nodes if n.get("drv") == "file"}

    async def _unlink(
        self, name: str, disk: Disk, open_files: set[str] | None
    ) -> tuple[str | None, str | None]:
        """Delete one disk file unless QEMU has it open: (removed, leftover)."""
        try:
            path = self._path(disk, name)
        except SpecRejected as exc:
            return None, f"{disk.datastore}:{disk.path}: {exc}"
        if open_files is None or str(path) in open_files:
            return None, f"{path}: in use by QEMU (or QEMU does not answer): kept"
        try:
            existed = path.exists()
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            return None, f"{path}: {exc}"
        self._remove_empty_folder(disk, name)
        return (str(path) if existed else None), None

    def _datastore(self, name: str, vm: str, field: str = "datastore") -> DatastoreConfig:
        ds = self.vms.config.datastore(name)
        if ds is None:
            known = ", ".join(d.name for d in self.vms.config.datastores) or "none"
            raise SpecRejected(
                f"datastore {name!r} is not available on host {self.vms.config.name} "
                f"(it has: {known})",
                vm=vm,
                field=field,
            )
        return ds

    def _path(self, disk: Disk, vm: str) -> Path:
        return self._datastore(disk.datastore, vm).path / disk.path

    def _remove_empty_folder(self, disk: Disk, vm: str) -> None:
        """The VM's folder on a datastore, once empty; never the datastore's root."""
        root = self._datastore(disk.datastore, vm).path
        folder = (root / disk.path).parent
        if folder != root:
            with contextlib.suppress(OSError):
                folder.rmdir()

    # ------------------------------------------------------------------ disks

    async def disks(self, name: str) -> list[DiskUsage]:
        """Each disk with its size as the guest sees it and what the file occupies."""
        spec = self.vms.spec(name)
        out = []
        for i, disk in enumerate(spec.disks):
            size = allocated = None
            with contextlib.suppress(OperationFailed, SpecRejected, OSError, ValueError):
                info = await asyncio.to_thread(qemu_img_info, self._path(disk, name))
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
        rec = self._load(name)
        if rec is not None and rec.phase == "failed":
            await self._abort(name, rec)  # an earlier move's leftovers (never switched)
        if (reason := self.unresolved(name)) is not None:
            raise Conflict(f"VM {name} cannot start a storage move: {reason}", vm=name)
        ds = self._datastore(req.datastore, name)
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
            info = await asyncio.to_thread(qemu_img_info, self._path(disk, name))
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
                    path=self._free_name(ds, name, i, fmt),
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
            self._save(name, rec)
            try:
                for moved, (size, _) in zip(rec.disks, sizes, strict=True):
                    await self._create_target(name, ds, moved, size)
                    await mon.execute(
                        "blockdev-mirror",
                        {
                            "job-id": moved.job,
                            "device": moved.source_node,
                            "target": moved.target_node,
                            "sync": "full",
                            "copy-mode": "background",
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

    def _free_name(self, ds: DatastoreConfig, vm: str, index: int, fmt: str) -> str:
        base = f"{vm}/disk{index}"
        for n in range(1000):
            rel = f"{base}.{fmt}" if n == 0 else f"{base}-{n}.{fmt}"
            if not (ds.path / rel).exists():
                return rel
        raise OperationFailed(f"no free file name for disk {index} of {vm} on {ds.name}", vm=vm)

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
        mon = self.vms.monitor(name)
        await mon.execute(
            "blockdev-add",
            {
                "driver": "file",
                "filename": str(path),
                "node-name": moved.target_file_node,
                "cache": {"direct": False},
            },
        )
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
            rec = self._load(name)
            if rec is None:
                raise Conflict(f"VM {name} has no storage move", vm=name)
            if rec.phase == "switching":
                await self._settle(name, rec)
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
        self._save(name, rec)
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
            await write_blocking(
                self.vms.monitor(name), name, [(d.index, d.job) for d in rec.disks]
            )
            rec.copy_mode = "write-blocking"
            self._save(name, rec)
            return await self._status(name, rec)

    def _require(self, name: str, phases: tuple[str, ...]) -> MoveRecord:
        self.vms.spec(name)
        rec = self._load(name)
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
                await self._settle(name, rec)
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
            try:
                for d in rec.disks:
                    await mon.execute("job-complete", {"id": d.job})
                await self._wait_all(mon, rec, ("pending",))
            except (HypervisorError, OperationFailed) as exc:
                rec.phase, rec.error = "failed", f"pivot refused, nothing switched: {exc}"
                self._save(name, rec)
                await self._cancel_jobs(mon, rec)
                raise OperationFailed(
                    f"the disks of {name} could not all be switched, so none was: {exc}",
                    vm=name,
                ) from exc
            # From the first finalize on, QEMU may run on a target: recorded before it.
            rec.phase = "switching"
            self._save(name, rec)
            errors = []
            for d in rec.disks:
                try:
                    await mon.execute("job-finalize", {"id": d.job})
                except HypervisorError as exc:
                    errors.append(f"disk {d.index}: {exc}")
            await self._settle(name, rec, "; ".join(errors) or None)
            if str(rec.phase) != "pivoted" or rec.error:
                raise OperationFailed(
                    f"pivot of {name}: {rec.error or rec.phase}; see the move's status", vm=name
                )
            return await self._status(name, rec)

    async def _settle(self, name: str, rec: MoveRecord, error: str | None = None) -> None:
        """A ``switching`` record made true: QEMU's answer of which disks run on their
        targets decides. QEMU not answering leaves it ``switching`` (both copies kept)."""
        try:
            mon = self.vms.monitor(name)
            nodes = await source_nodes(mon)
        except (HypervisorError, Conflict) as exc:
            rec.error = f"whether the disks switched is unknown (QEMU: {exc}); both copies kept"
            self._save(name, rec)
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
            await self._cancel_jobs(mon, rec)
            rec.phase = "failed"
            rec.error = error or "the pivot was interrupted; nothing switched"
            self._save(name, rec)
            return
        # A job that did not switch is cancelled (a pending one cannot be dismissed).
        await self._cancel_jobs(mon, rec)
        rec.phase = "pivoted"
        if len(switched) != len(rec.disks):
            # All were pending, then QEMU refused a finalize: the truth is a split VM. Its
            # definition names what QEMU runs on; the targets that did not switch go at release.
            stay = [d.index for d in rec.disks if not d.switched]
            rec.error = f"disks {stay} did not switch ({error or 'QEMU refused'}); they stay"
        self._save(name, rec)
        for d in switched:
            # The old nodes stay open (monitor-owned) until deleted; their files go later.
            for node in (d.source_node, d.source_file_node):
                if node:
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("blockdev-del", {"node-name": node})

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

    async def _cancel_jobs(self, mon: Monitor, rec: MoveRecord) -> bool:
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

    # ------------------------------------------------------------------ release / abort

    async def release(self, name: str) -> MirrorStatus:
        """After the pivot: remove the old files, and the targets of disks that did not
        switch. A file QEMU has open is kept and named. Idempotent."""
        async with self._lock(name):
            self.vms.spec(name)
            rec = self._load(name)
            if rec is None:  # released before; its answer was lost
                return MirrorStatus(vm=name, phase="released", datastore="")
            if rec.phase == "switching":
                await self._settle(name, rec)
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
            open_files = await self._open_files(name)
            removed, leftovers = [], []
            for d in rec.disks:
                got, left = await self._unlink(
                    name, d.source if d.switched else d.target, open_files
                )
                removed += [got] if got else []
                leftovers += [left] if left else []
            rec.phase = "released"
            status = await self._status(name, rec)
            self._save(name, None)
            self._last.pop(name, None)
            return status.model_copy(update={"removed": removed, "leftovers": leftovers})

    async def abort(self, name: str) -> MirrorStatus:
        """Cancel the mirror: the VM stays on its old disks, the new files are removed.

        Idempotent; refused (``already_switched``) once a disk switched: then only
        ``release`` is right."""
        async with self._lock(name):
            self.vms.spec(name)
            rec = self._load(name)
            if rec is None:
                return MirrorStatus(vm=name, phase="aborted", datastore="")
            if rec.phase == "switching":
                await self._settle(name, rec)
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
            if not await self._cancel_jobs(mon, rec):
                rec.phase = "failed"
                rec.error = rec.error or "the mirror jobs did not end"
                self._save(name, rec)
                raise OperationFailed(
                    f"the mirror jobs of {name} did not end; its new files are kept", vm=name
                )
            for d in rec.disks:
                for node in (d.target_node, d.target_file_node):
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("blockdev-del", {"node-name": node})
        spec = self.vms.spec(name)
        in_use = {(disk.datastore, disk.path) for disk in spec.disks}
        open_files = await self._open_files(name)
        removed, leftovers = [], []
        for d in rec.disks:
            if (d.target.datastore, d.target.path) in in_use:
                continue  # never delete what the definition runs on
            got, left = await self._unlink(name, d.target, open_files)
            removed += [got] if got else []
            leftovers += [left] if left else []
        error = rec.error
        self._save(name, None)
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
