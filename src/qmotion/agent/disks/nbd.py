"""Shared-nothing live migration's disks: the destination exports empty disks over NBD, the
source mirrors every disk into them and ends the mirrors in sync at switchover.

How QEMU is driven (QEMU 10.0), and why:

- destination: every copied disk is a fresh image (``qemu-img create``: reads as zeros, so
  what the source never wrote is never sent and a sparse disk stays sparse) on the chosen
  datastore; QEMU starts with them (``-incoming defer``) and serves them writable
  (``nbd-server-start`` on the migration address, TLS with the migration's credentials,
  ``block-export-add``; exporting activates the nodes the incoming QEMU holds inactive). The
  files are recorded as this incoming's own (``incoming-disks.json``): a rollback removes
  them with the VM; once the VM resumed here they are the VM's, the exports end;
- source: one ``blockdev-mirror`` per disk into an NBD client node, ``sync: full``, in
  ``background`` mode until every job is ready (or the copy stops gaining), then
  ``write-blocking``: a guest write completes only once the destination has it, so the copy
  converges under any write load and stays in sync (``actively-synced``). RAM migration starts
  only then, with ``pause-before-switchover``: when QEMU stops the guest for the switchover,
  each job is ended in sync (``block-job-cancel`` of a ready mirror: its last dirty blocks
  copied, nothing pivoted) before the device state is sent, so the destination never runs
  on a disk that lacks a write. A job that cannot end in sync cancels the migration instead:
  the guest resumes on its own disks;
- the source's files go only in ``release``, which QEMU's own word gates (the VM migrated
  away and the manager saw the destination run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qmotion.agent.config import DatastoreConfig
from qmotion.agent.disks.storage import (
    SPACE_MARGIN,
    free_bytes,
    mirror_jobs,
    source_nodes,
    write_blocking,
)
from qmotion.agent.errors import AgentError, Conflict, OperationFailed, SpecRejected
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import INCOMING_DISKS, VmManager
from qmotion.api.storage import (
    CopyMode,
    DiskCopyPlan,
    DiskMirror,
    MirrorPhase,
    MirrorStatus,
    NbdExport,
    NbdMirrorRequest,
    NbdTargets,
)
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)

RECORD = "nbd-mirror.json"
JOB_PREFIX = "qm-nbd-"
NODE_PREFIX = "qm-nbd"
EXPORT_ID = "qm-exp-"
TLS_CREDS = "qm-tls-nbd"  # not the stream's: QEMU refuses to replace credentials in use
STALL_SWITCH_S = 10.0  # background copy not gaining this long: switch to write-blocking
END_WAIT_S = 10.0  # jobs ending in sync at switchover (the guest is paused meanwhile)
PORT_ATTEMPTS = 8


# ---------------------------------------------------------------- destination


def _free_name(ds: DatastoreConfig, vm: str, index: int, fmt: str) -> str:
    base = f"{vm}/disk{index}"
    for n in range(1000):
        rel = f"{base}.{fmt}" if n == 0 else f"{base}-{n}.{fmt}"
        if not (ds.path / rel).exists():
            return rel
    raise OperationFailed(f"no free file name for disk {index} of {vm} on {ds.name}", vm=vm)


class IncomingDisks:
    """The destination's half: empty disks made, exported, and ended."""

    def __init__(self, vms: VmManager) -> None:
        self.vms = vms

    def _datastore(self, plan: DiskCopyPlan, vm: str) -> DatastoreConfig:
        ds = self.vms.config.datastore(plan.datastore)
        if ds is None:
            known = ", ".join(d.name for d in self.vms.config.datastores) or "none"
            raise SpecRejected(
                f"datastore {plan.datastore!r} is not available on host "
                f"{self.vms.config.name} (it has: {known})",
                vm=vm,
                field="datastore",
            )
        return ds

    def check(self, spec: VmSpec, plan: DiskCopyPlan) -> DatastoreConfig:
        """What ``create`` would refuse; changes nothing."""
        ds = self._datastore(plan, spec.name)
        for d in plan.disks:
            if d.index >= len(spec.disks):
                raise SpecRejected(
                    f"VM {spec.name} has no disk {d.index}", vm=spec.name, field="copy_disks"
                )
        need = int(sum(d.allocated_bytes for d in plan.disks) * SPACE_MARGIN)
        have = free_bytes(ds.path)
        if have < need:
            raise SpecRejected(
                f"datastore {plan.datastore} has {have >> 20} MiB free on host "
                f"{self.vms.config.name}; the disks of {spec.name} occupy {need >> 20} MiB",
                vm=spec.name,
                field="datastore",
            )
        return ds

    async def create(self, spec: VmSpec, plan: DiskCopyPlan) -> tuple[VmSpec, list[Disk]]:
        """The spec naming the new, empty disks, and those disks (created here)."""
        ds = await asyncio.to_thread(self.check, spec, plan)
        disks = list(spec.disks)
        made: list[Disk] = []
        try:
            for d in plan.disks:
                old = spec.disks[d.index]
                fmt = plan.format or old.format
                new = Disk(
                    datastore=plan.datastore,
                    path=_free_name(ds, spec.name, d.index, fmt),
                    format=fmt,
                    bootable=old.bootable,
                )
                path = ds.path / new.path
                path.parent.mkdir(parents=True, exist_ok=True)
                proc = await asyncio.to_thread(
                    subprocess.run,
                    ["qemu-img", "create", "-q", "-f", fmt, str(path), str(d.virtual_size)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    raise OperationFailed(
                        f"creating {path} failed: {proc.stderr.strip()}", vm=spec.name
                    )
                made.append(new)
                disks[d.index] = new
        except BaseException:
            self.remove(made)
            raise
        return spec.model_copy(update={"disks": disks}), made

    def remove(self, disks: list[Disk]) -> None:
        for disk in disks:
            ds = self.vms.config.datastore(disk.datastore)
            if ds is None:
                continue
            path = ds.path / disk.path
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if path.parent != ds.path:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()

    def own(self, name: str, made: list[Disk]) -> None:
        """Recorded with the VM: deleting it before it ran here removes them."""
        data = "[" + ",".join(d.model_dump_json() for d in made) + "]"
        self.vms._write(self.vms._dir(name) / INCOMING_DISKS, data)

    async def export(
        self, name: str, mon: Monitor, listen: str, indices: list[int], tls_creds: str | None
    ) -> NbdTargets:
        """Serve the disks ``indices`` writable over NBD on ``listen``."""
        port = await self._start_server(mon, listen, tls_creds)
        exports = []
        for i in indices:
            export = NbdExport(index=i, name=f"disk{i}")
            await mon.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": f"{EXPORT_ID}{i}",
                    "node-name": f"disk{i}",
                    "name": export.name,
                    "writable": True,
                },
            )
            exports.append(export)
        return NbdTargets(
            host=listen, port=port, exports=exports, disks=list(self.vms.spec(name).disks)
        )

    @staticmethod
    async def _start_server(mon: Monitor, listen: str, tls_creds: str | None) -> int:
        """QEMU reports no port it chose itself: a free one is found and taken, again if
        another process took it in between."""
        last: Exception | None = None
        for _ in range(PORT_ATTEMPTS):
            with socket.socket() as probe:
                probe.bind((listen, 0))
                port = int(probe.getsockname()[1])
            args: dict[str, Any] = {
                "addr": {"type": "inet", "data": {"host": listen, "port": str(port)}}
            }
            if tls_creds:
                args["tls-creds"] = tls_creds
            try:
                await mon.execute("nbd-server-start", args)
                return port
            except QmpError as exc:
                last = exc
        raise OperationFailed(f"no NBD server could listen on {listen}: {last}")

    async def end(self, name: str, after_s: float = 0.0) -> None:
        """The VM runs here: its disks are its own, nobody writes to them over NBD."""
        path = self.vms._dir(name) / INCOMING_DISKS
        if not path.exists():
            return
        # The record goes first: from the resume on, a delete must not take the disks.
        path.unlink(missing_ok=True)
        await asyncio.sleep(after_s)
        with contextlib.suppress(HypervisorError, Conflict):
            mon = self.vms.monitor(name)
            for exp in await mon.execute("query-block-exports"):
                if str(exp.get("id", "")).startswith(EXPORT_ID):
                    with contextlib.suppress(HypervisorError):
                        await mon.execute("block-export-del", {"id": exp["id"], "mode": "hard"})
            with contextlib.suppress(HypervisorError):
                await mon.execute("nbd-server-stop")


# ---------------------------------------------------------------- source


class MirroredDisk(BaseModel):
    index: int
    job: str
    node: str  # the NBD client node (the job's target)
    export: str
    source: Disk
    target: Disk


class MirrorRecord(BaseModel):
    """What the source persists of one VM's mirror to its destination."""

    peer: str
    port: int
    phase: MirrorPhase
    copy_mode: CopyMode = "background"
    disks: list[MirroredDisk]
    error: str | None = None


class NbdMirrors:
    """The source's half: mirror into the destination's exports, end in sync at switchover."""

    def __init__(self, vms: VmManager, tls: TlsStore | None = None) -> None:
        self.vms = vms
        self.tls = tls
        self._locks: dict[str, asyncio.Lock] = {}
        # name -> (least remaining seen, when), for "stops gaining", and (time, copied) for rates
        self._best: dict[str, tuple[int, float]] = {}
        self._last: dict[str, tuple[float, int]] = {}

    def _path(self, name: str) -> Path:
        return self.vms._dir(name) / RECORD

    def load(self, name: str) -> MirrorRecord | None:
        path = self._path(name)
        if not path.is_file():
            return None
        return MirrorRecord.model_validate_json(path.read_text())

    def _save(self, name: str, rec: MirrorRecord | None) -> None:
        if rec is None:
            self._path(name).unlink(missing_ok=True)
        else:
            self.vms._write(self._path(name), rec.model_dump_json(indent=2))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def active(self, name: str) -> bool:
        """A mirror that must end in sync before this VM's device state may be sent."""
        with contextlib.suppress(OSError, ValueError):
            rec = self.load(name)
            return rec is not None and rec.phase in ("mirroring", "ready")
        return True  # unreadable: assume the worst (the switchover checks the jobs)

    # ------------------------------------------------------------------ start

    async def start(self, name: str, req: NbdMirrorRequest) -> MirrorStatus:
        async with self._lock(name):
            spec = self.vms.spec(name)
            mon = self.vms.monitor(name)
            if (reason := self.vms.storage_guard(name)) is not None:
                raise Conflict(f"VM {name} cannot copy its disks now: {reason}", vm=name)
            old = self.load(name)
            if old is not None and old.phase in ("mirroring", "ready"):
                if (old.peer, old.port) == (str(req.host), req.port):
                    # The same request again (its answer was lost): how it stands.
                    return await self._status(name, old, mon)
                raise Conflict(f"VM {name} is already mirroring its disks", vm=name)
            if old is not None:
                await self._abort(name, old)  # an earlier migration's leftovers
            if (await mon.status()) not in ("running", "paused"):
                raise Conflict(f"VM {name} is not running: nothing to mirror live", vm=name)
            for e in req.exports:
                if e.index >= len(spec.disks):
                    raise SpecRejected(f"VM {name} has no disk {e.index}", vm=name, field="exports")
            nodes = await source_nodes(mon)
            targets = {i: d for i, d in enumerate(req.targets)}
            rec = MirrorRecord(
                peer=str(req.host),
                port=req.port,
                phase="mirroring",
                disks=[
                    MirroredDisk(
                        index=e.index,
                        job=f"{JOB_PREFIX}{e.index}",
                        node=f"{NODE_PREFIX}{e.index}",
                        export=e.name,
                        source=spec.disks[e.index],
                        target=targets.get(n, spec.disks[e.index]),
                    )
                    for n, e in enumerate(req.exports)
                ],
            )
            # Before any node exists: whoever asks next (status, abort) finds what to end.
            self._save(name, rec)
            try:
                creds = await self._tls_creds(mon, req) if req.tls else None
                for d in rec.disks:
                    server = {"type": "inet", "host": rec.peer, "port": str(rec.port)}
                    node: dict[str, Any] = {
                        "driver": "nbd",
                        "node-name": d.node,
                        "server": server,
                        "export": d.export,
                    }
                    if creds:
                        node["tls-creds"] = creds
                        if req.tls_hostname:
                            node["tls-hostname"] = req.tls_hostname
                    await mon.execute("blockdev-add", node)
                    await mon.execute(
                        "blockdev-mirror",
                        {
                            "job-id": d.job,
                            "device": nodes.get(d.index, (f"disk{d.index}", None))[0],
                            "target": d.node,
                            "sync": "full",
                            "copy-mode": "background",
                            "speed": req.speed or 0,
                            "auto-dismiss": False,
                        },
                    )
            except (HypervisorError, AgentError) as exc:
                rec.error = f"starting the mirror failed: {exc}"
                await self._abort(name, rec)
                raise OperationFailed(
                    f"mirroring the disks of {name} to {rec.peer}:{rec.port} did not start: "
                    f"{exc}; the VM runs on its own disks",
                    vm=name,
                    qmp_class=getattr(exc, "qmp_class", None),
                ) from exc
            self._best.pop(name, None)
            self._last[name] = (time.monotonic(), 0)
            return await self._status(name, rec, mon)

    async def _tls_creds(self, mon: Monitor, req: NbdMirrorRequest) -> str:
        if self.tls is None or not self.tls.ready:
            raise Conflict(
                "this host has no certificate from the cluster CA for an encrypted disk copy; "
                "register it with the manager again"
            )
        with contextlib.suppress(HypervisorError):
            await mon.execute("object-del", {"id": TLS_CREDS})
        await mon.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": TLS_CREDS,
                "endpoint": "client",
                "dir": str(self.tls.qemu_dir),
                "verify-peer": True,
            },
        )
        return TLS_CREDS

    # ------------------------------------------------------------------ status

    async def status(self, name: str) -> MirrorStatus:
        async with self._lock(name):
            self.vms.spec(name)
            rec = self.load(name)
            if rec is None:
                raise Conflict(f"VM {name} has no disk mirror", vm=name)
            mon: Monitor | None = None
            with contextlib.suppress(Conflict):
                mon = self.vms.monitor(name)
            return await self._status(name, rec, mon)

    async def _jobs(self, mon: Monitor) -> dict[str, dict[str, Any]]:
        return await mirror_jobs(mon, JOB_PREFIX)

    async def _status(self, name: str, rec: MirrorRecord, mon: Monitor | None) -> MirrorStatus:
        jobs: dict[str, dict[str, Any]] = {}
        if rec.phase in ("mirroring", "ready"):
            try:
                if mon is None:
                    raise Conflict("not running")
                jobs = await self._jobs(mon)
            except QmpError as exc:
                raise OperationFailed(f"querying the mirror of {name}: {exc}", vm=name) from exc
            except (HypervisorError, Conflict) as exc:
                rec.phase, rec.error = "failed", f"the VM's QEMU is gone: {exc}"
        disks = []
        for d in rec.disks:
            j = jobs.get(d.job, {})
            status = str(j.get("status") or ("concluded" if rec.phase == "completed" else "gone"))
            error = j.get("error")
            if rec.phase in ("mirroring", "ready") and (error or status in ("gone", "concluded")):
                rec.phase = "failed"
                rec.error = f"disk {d.index}: {error or 'its mirror job ended'}"
            disks.append(
                DiskMirror(
                    index=d.index,
                    job=d.job,
                    source=d.source,
                    target=d.target,
                    status=status,
                    offset=int(j.get("offset", 0)),
                    length=int(j.get("len", 0)),
                    ready=bool(j.get("ready", rec.phase == "completed")),
                    actively_synced=bool(j.get("actively_synced", rec.phase == "completed")),
                    error=error,
                )
            )
        total = sum(d.length for d in disks)
        copied = sum(d.offset for d in disks)
        now = time.monotonic()
        if rec.phase == "mirroring" and disks and all(d.ready for d in disks):
            rec.phase = "ready"
        if rec.phase in ("mirroring", "ready") and rec.copy_mode == "background" and mon:
            remaining = total - copied
            best, since = self._best.get(name, (remaining + 1, now))
            if remaining < best:
                self._best[name] = (remaining, now)
            if rec.phase == "ready" or (remaining >= best and now - since > STALL_SWITCH_S):
                # In sync (or the guest writes faster than the background copy): from now
                # on a guest write completes only once the destination has it.
                await self._write_blocking(name, rec, mon)
        self._save(name, rec)
        t0, c0 = self._last.get(name, (now, copied))
        rate = (copied - c0) / (now - t0) if now > t0 and copied >= c0 else 0.0
        self._last[name] = (now, copied)
        return MirrorStatus(
            vm=name,
            phase=rec.phase,
            datastore=rec.disks[0].target.datastore if rec.disks else "",
            copy_mode=rec.copy_mode,
            disks=disks,
            total_bytes=total,
            remaining_bytes=max(0, total - copied),
            rate_bps=rate,
            error=rec.error,
        )

    async def _write_blocking(self, name: str, rec: MirrorRecord, mon: Monitor) -> None:
        await write_blocking(mon, name, [(d.index, d.job) for d in rec.disks])
        rec.copy_mode = "write-blocking"

    # ------------------------------------------------------------------ switchover

    async def end_in_sync(self, name: str, mon: Monitor) -> str | None:
        """At pre-switchover (the guest paused): every job ends with its target in sync.
        None when they did; else why not (then the migration must be cancelled)."""
        t0 = time.monotonic()
        rec = self.load(name)
        if rec is None:
            return "the disk mirror record is gone"
        try:
            # The guest is paused: this costs downtime, so one query (ready, not failed).
            jobs = {j["device"]: j for j in await mon.execute("query-block-jobs")}
            for d in rec.disks:
                j = jobs.get(d.job)
                if j is None or j.get("error") or not j.get("ready"):
                    why = (j or {}).get("error") or "not ready"
                    return f"disk {d.index} is not in sync ({why})"
            for d in rec.disks:
                # A ready mirror "cancelled" completes: its last dirty blocks are copied and
                # the guest stays on its own disk (nothing pivots).
                await mon.execute("block-job-cancel", {"device": d.job})
            deadline = time.monotonic() + END_WAIT_S
            ids = {d.job for d in rec.disks}
            while True:
                states = {j["id"]: j for j in await mon.execute("query-jobs") if j["id"] in ids}
                if any(j.get("error") for j in states.values()):
                    bad = next(j for j in states.values() if j.get("error"))
                    return f"mirror job {bad['id']} failed: {bad['error']}"
                if len(states) == len(ids) and all(
                    j.get("status") == "concluded" for j in states.values()
                ):
                    break
                if time.monotonic() > deadline:
                    return f"the mirror jobs did not end within {END_WAIT_S:.0f} s"
                await asyncio.sleep(0.001)
        except HypervisorError as exc:
            return f"ending the mirror failed: {exc}"
        rec.phase = "completed"
        self._save(name, rec)
        log.info("disks of %s ended in sync in %.1f ms", name, (time.monotonic() - t0) * 1000)
        return None

    async def after_migration(self, name: str, completed: bool) -> None:
        """The stream finished: jobs dismissed, the NBD connections closed. A stream that
        did not complete voids the copy (the guest runs on here and writes again): the
        record goes, so no later release takes these disks for copied ones."""
        with contextlib.suppress(OSError, ValueError):
            rec = self.load(name)
            if rec is None:
                return
            if not completed:
                with contextlib.suppress(AgentError):
                    await self.abort(name)
                return
            if rec.phase != "completed":
                return
            with contextlib.suppress(Conflict, HypervisorError):
                mon = self.vms.monitor(name)
                await self._dismiss_and_close(mon, rec)

    async def void(self, name: str) -> None:
        """The VM runs on here (resumed, or migrating without a copy): any copy record is
        stale. Its jobs and nodes are ended with it."""
        with contextlib.suppress(OSError, ValueError):
            if self.load(name) is not None:
                await self.abort(name)

    @staticmethod
    async def _dismiss_and_close(mon: Monitor, rec: MirrorRecord) -> None:
        for d in rec.disks:
            with contextlib.suppress(HypervisorError):
                await mon.execute("job-dismiss", {"id": d.job})
        for d in rec.disks:
            with contextlib.suppress(HypervisorError):
                await mon.execute("blockdev-del", {"node-name": d.node})
        with contextlib.suppress(HypervisorError):
            await mon.execute("object-del", {"id": TLS_CREDS})

    # ------------------------------------------------------------------ abort

    async def abort(self, name: str) -> MirrorStatus:
        """Stop copying: the VM keeps running on its own disks (the destination's copies
        are the destination's to remove). Idempotent."""
        async with self._lock(name):
            self.vms.spec(name)
            rec = self.load(name)
            if rec is None:
                return MirrorStatus(vm=name, phase="aborted", datastore="")
            return await self._abort(name, rec)

    async def _abort(self, name: str, rec: MirrorRecord) -> MirrorStatus:
        mon: Monitor | None = None
        with contextlib.suppress(Conflict):
            mon = self.vms.monitor(name)
        if mon is not None:
            ids = {d.job for d in rec.disks}
            with contextlib.suppress(HypervisorError):
                for j in await mon.execute("query-jobs"):
                    if j.get("id") in ids and j.get("status") != "concluded":
                        with contextlib.suppress(HypervisorError):
                            # force: a ready mirror would otherwise finish its copy first
                            await mon.execute(
                                "block-job-cancel", {"device": j["id"], "force": True}
                            )
            deadline = time.monotonic() + END_WAIT_S
            while time.monotonic() < deadline:
                try:
                    left = [
                        j
                        for j in await mon.execute("query-jobs")
                        if j.get("id") in ids and j.get("status") != "concluded"
                    ]
                except HypervisorError:
                    break
                if not left:
                    break
                await asyncio.sleep(0.05)
            else:
                raise OperationFailed(f"the disk mirror jobs of {name} did not end", vm=name)
            await self._dismiss_and_close(mon, rec)
        self._save(name, None)
        self._best.pop(name, None)
        self._last.pop(name, None)
        return MirrorStatus(
            vm=name,
            phase="aborted",
            datastore=rec.disks[0].target.datastore if rec.disks else "",
            copy_mode=rec.copy_mode,
            error=rec.error,
        )

    def copied_sources(self, name: str) -> list[Disk]:
        """The source files a completed copy replaced (removed once the VM left)."""
        with contextlib.suppress(OSError, ValueError):
            rec = self.load(name)
            if rec is not None and rec.phase == "completed":
                return [d.source for d in rec.disks]
        return []
