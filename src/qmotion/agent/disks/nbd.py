"""Shared-nothing live migration's disks, the source's half: the destination exports empty disks
over NBD (``qmotion.agent.disks.nbd_incoming``), the source mirrors every disk into them and
ends the mirrors in sync at switchover.

How QEMU is driven (QEMU 10.0), and why:

- one ``blockdev-mirror`` per disk into an NBD client node, ``sync: full``, in
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
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qmotion.agent.errors import AgentError, Conflict, OperationFailed, SpecRejected
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.storage import CopyMode, DiskMirror, MirrorPhase, MirrorStatus, NbdMirrorRequest
from qmotion.api.vm import Disk
from qmotion.hypervisor.blockjobs import mirror_jobs, source_nodes, write_blocking
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)

RECORD = "nbd-mirror.json"
JOB_PREFIX = "qm-nbd-"
NODE_PREFIX = "qm-nbd"
TLS_CREDS = "qm-tls-nbd"  # not the stream's: QEMU refuses to replace credentials in use
STALL_SWITCH_S = 10.0  # background copy not gaining this long: switch to write-blocking
END_WAIT_S = 10.0  # jobs ending in sync at switchover (the guest is paused meanwhile)


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
        try:
            await write_blocking(mon, name, [(d.index, d.job) for d in rec.disks])
        except HypervisorError as exc:
            raise OperationFailed.of(exc, vm=name) from exc
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
