"""The destination's half of a shared-nothing migration's disks: empty disks made, exported
over NBD for the source's mirror, and ended once the VM runs here.

How QEMU is driven (QEMU 10.0), and why: every copied disk is a fresh image (``qemu-img
create``: reads as zeros, so what the source never wrote is never sent and a sparse disk stays
sparse) on the chosen datastore; QEMU starts with them (``-incoming defer``) and serves them
writable (``nbd-server-start`` on the migration address, TLS with the migration's credentials,
``block-export-add``; exporting activates the nodes the incoming QEMU holds inactive). The
files are recorded as this incoming's own (``incoming-disks.json``): a rollback removes them
with the VM; once the VM resumed here they are the VM's, the exports end. The source's half is
``qmotion.agent.disks.nbd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from typing import Any

from qmotion.agent.config import DatastoreConfig
from qmotion.agent.disks.datastores import SPACE_MARGIN, datastore, free_bytes, free_name
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected
from qmotion.agent.vms.manager import INCOMING_DISKS, VmManager
from qmotion.api.storage import DiskCopyPlan, NbdExport, NbdTargets
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor.errors import HypervisorError, QmpError
from qmotion.hypervisor.monitor import Monitor

EXPORT_ID = "qm-exp-"
PORT_ATTEMPTS = 8


class IncomingDisks:
    """The destination's half: empty disks made, exported, and ended."""

    def __init__(self, vms: VmManager) -> None:
        self.vms = vms

    def check(self, spec: VmSpec, plan: DiskCopyPlan) -> DatastoreConfig:
        """What ``create`` would refuse; changes nothing."""
        ds = datastore(self.vms.config, plan.datastore, spec.name)
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
                    path=free_name(ds, spec.name, d.index, fmt),
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
        self,
        name: str,
        mon: Monitor,
        listen: str,
        indices: list[int],
        tls_creds: str | None,
        tls_authz: str | None = None,
    ) -> NbdTargets:
        """Serve the disks ``indices`` writable over NBD on ``listen``."""
        port = await self._start_server(mon, listen, tls_creds, tls_authz)
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
    async def _start_server(
        mon: Monitor, listen: str, tls_creds: str | None, tls_authz: str | None = None
    ) -> int:
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
                if tls_authz:  # only the source's certificate writes to these disks
                    args["tls-authz"] = tls_authz
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
