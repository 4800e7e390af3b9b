"""Disk transfers between hosts for a stopped VM: read-only NBD exports on the source, a
verified copy on the destination.

Source: ``qemu-nbd --read-only`` per disk on the host's migration address (``--fork``: it
returns once it listens); once the host has its certificate, over TLS that demands the
reader's certificate from the cluster CA and, per transfer, that it be the destination's
(QEMU's ``authz-simple`` on the certificate's name). It serves what the guest sees (raw)
with the image's allocation, so the copy stays sparse. Destination: ``qemu-img convert`` from
the export into a new image (the format asked), then ``qemu-img compare`` of the copy against
the export, byte for byte; a copy that fails either is removed. The exports' PIDs are written
to the VM's directory, so an agent restarted midway still ends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from pydantic import BaseModel, Field

from qmotion.agent.disks.datastores import image_info
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.storage import DiskCopy, DiskCopyRequest, DiskExport
from qmotion.api.vm import Disk
from qmotion.hypervisor import process

log = logging.getLogger(__name__)
EXPORTS = "exports.json"
HOLD = "moving"  # a file in the VM's directory while a cold migration holds it
COPY_TIMEOUT_S = 6 * 3600.0


class Exports(BaseModel):
    pids: list[int] = Field(default_factory=list)
    disks: list[DiskExport] = Field(default_factory=list)
    reader: str | None = None  # the one host that may read them (TLS exports)


async def end_exports(vm_dir: Path) -> None:
    """End the qemu-nbd exports recorded in a VM's directory (after an agent restart too)."""
    path = vm_dir / EXPORTS
    if not path.is_file():
        return
    known = Exports.model_validate_json(path.read_text())
    left = await asyncio.to_thread(process.end_nbd_exports, known.pids)
    if left:
        raise OperationFailed(f"qemu-nbd {left} did not end; its record is kept")
    path.unlink(missing_ok=True)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _opt(value: str) -> str:
    """A value inside QEMU's key=value options: a comma is doubled, never a separator."""
    return value.replace(",", ",,")


def _nbd_opts(uri: str, tls: bool) -> str:
    """``--image-opts`` of a raw NBD export (``nbd://HOST:PORT/NAME``), over TLS or not."""
    rest = uri.removeprefix("nbd://")
    hostport, _, export = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    opts = (
        f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={_opt(host)},"
        f"file.server.port={_opt(port)},file.export={_opt(export)}"
    )
    return opts + (",file.tls-creds=tls0" if tls else "")


class Transfers:
    def __init__(self, vms: VmManager, tls: TlsStore | None = None) -> None:
        self.vms = vms
        self.tls = tls

    def _tls_object(self, endpoint: str) -> list[str]:
        assert self.tls is not None
        verify = ",verify-peer=on" if endpoint == "server" else ""
        return [
            "--object",
            f"tls-creds-x509,id=tls0,dir={_opt(str(self.tls.qemu_dir))},endpoint={endpoint}"
            + verify,
        ]

    def _exports_path(self, name: str) -> Path:
        return self.vms._dir(name) / EXPORTS

    def _address(self) -> str:
        cfg = self.vms.config
        return (cfg.migration_addresses or (cfg.address or "127.0.0.1",))[0]

    async def _run(self, *argv: str, timeout_s: float = COPY_TIMEOUT_S) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out.decode(errors="replace").strip()

    # ------------------------------------------------------------------ source

    async def export(
        self, name: str, copy: bool = True, reader: str | None = None
    ) -> list[DiskExport]:
        """Hold a stopped VM (no start here until released) and, with ``copy``, serve every
        disk (and a suspended VM's saved state) read-only. Idempotent. With this host's
        certificate the exports are TLS, and with ``reader`` only that host may read them."""
        async with self.vms.locked(name) as spec:
            if await self.vms._alive(name) is not None:
                raise Conflict(f"VM {name} is running: only a stopped VM moves cold", vm=name)
            self.vms._write(self.vms._dir(name) / HOLD, "moving to another host\n")
            if not copy:
                return []
            path = self._exports_path(name)
            if path.is_file():
                known = Exports.model_validate_json(path.read_text())
                # Reused only for the same reader: a retry towards another destination must
                # not find exports the first one may still read.
                if all(process.is_nbd(p) for p in known.pids) and known.reader == reader:
                    return known.disks
                await self._end(name)
            address = self._address()
            tls = self.tls is not None and self.tls.ready
            exports = Exports(reader=reader)
            # The saved state of a suspended VM travels as one more (raw) disk, last.
            files = [*spec.disks, *([spec.saved_state] if spec.saved_state else [])]
            try:
                for i, disk in enumerate(files):
                    ds = self.vms.config.datastore(disk.datastore)
                    if ds is None:
                        raise SpecRejected(
                            f"datastore {disk.datastore} is not on host {self.vms.config.name}",
                            vm=name,
                            field=f"disks[{i}].datastore",
                        )
                    file = ds.path / disk.path
                    await asyncio.to_thread(self.vms.access.check_chain, name, file, disk.format)
                    info = await image_info(file)
                    port = _free_port(address)
                    pidfile = self.vms._dir(name) / f"nbd{i}.pid"
                    secure: list[str] = []
                    if tls:
                        secure = [*self._tls_object("server"), "--tls-creds=tls0"]
                        if reader:
                            secure += [
                                "--object",
                                f"authz-simple,id=authz0,identity=CN={_opt(reader)}",
                                "--tls-authz=authz0",
                            ]
                    code, out = await self._run(
                        "qemu-nbd",
                        *secure,
                        "--read-only",
                        "--persistent",
                        "--shared=4",
                        f"--format={disk.format}",
                        f"--bind={address}",
                        f"--port={port}",
                        f"--export-name=disk{i}",
                        f"--pid-file={pidfile}",
                        "--fork",
                        str(file),
                        timeout_s=30,
                    )
                    if code != 0:
                        raise OperationFailed(f"qemu-nbd for disk {i} of {name}: {out}", vm=name)
                    exports.pids.append(int(pidfile.read_text().strip()))
                    exports.disks.append(
                        DiskExport(
                            index=i,
                            uri=f"nbd://{address}:{port}/disk{i}",
                            format=disk.format,
                            virtual_size=int(info["virtual-size"]),
                            tls=tls,
                        )
                    )
                    self.vms._write(path, exports.model_dump_json())
            except BaseException:
                self.vms._write(path, exports.model_dump_json())
                await self._end(name)
                raise
            return exports.disks

    async def unexport(self, name: str, release: bool = True) -> None:
        """End the exports; with ``release`` also the hold (the move was rolled back)."""
        self.vms.spec(name)
        await self._end(name)
        if release:
            (self.vms._dir(name) / HOLD).unlink(missing_ok=True)

    async def _end(self, name: str) -> None:
        await end_exports(self.vms._dir(name))

    # ------------------------------------------------------------------ destination

    def _target(self, req: DiskCopyRequest) -> Path:
        ds = self.vms.config.datastore(req.datastore)
        if ds is None:
            raise SpecRejected(
                f"datastore {req.datastore} is not on host {self.vms.config.name}",
                field="datastore",
            )
        if req.path.startswith("/") or ".." in req.path.split("/"):
            raise SpecRejected("path must be relative to the datastore", field="path")
        return ds.path / req.path

    async def copy(self, req: DiskCopyRequest) -> DiskCopy:
        """Copy an export into a new image here and verify it; nothing is left on failure."""
        target = self._target(req)
        if target.exists():
            raise Conflict(f"{target} exists: a copy never overwrites a file", field="path")
        if req.tls and (self.tls is None or not self.tls.ready):
            raise Conflict("the export is TLS and this host has no certificate yet", field="tls")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if req.tls:
                tls = self._tls_object("client")
                source = _nbd_opts(req.uri, True)
                convert = [*tls, "--image-opts", source, "-O", req.format, str(target)]
                local = f"driver={req.format},file.driver=file,file.filename={_opt(str(target))}"
                compare = [*tls, "--image-opts", local, source]
            else:
                convert = ["-f", "raw", "-O", req.format, req.uri, str(target)]
                compare = ["-f", req.format, "-F", "raw", str(target), req.uri]
            code, out = await self._run("qemu-img", "convert", *convert)
            if code != 0:
                raise OperationFailed(f"copying {req.uri} to {target} failed: {out}")
            code, out = await self._run("qemu-img", "compare", *compare)
            if code != 0:
                raise OperationFailed(f"the copy {target} differs from {req.uri}: {out}")
            info = await image_info(target)
        except BaseException:
            target.unlink(missing_ok=True)
            ds = self.vms.config.datastore(req.datastore)
            if ds is not None and target.parent != ds.path:
                with contextlib.suppress(OSError):
                    target.parent.rmdir()  # the VM's folder, if the copy made it
            raise
        return DiskCopy(
            disk=Disk(datastore=req.datastore, path=req.path, format=req.format),
            virtual_size=int(info["virtual-size"]),
            allocated_bytes=int(info["actual-size"]),
        )

    async def remove_copy(self, datastore: str, path: str) -> bool:
        """A copy made for a move that was rolled back; never a disk a defined VM uses."""
        req = DiskCopyRequest(uri="nbd://0.0.0.0:0/x", datastore=datastore, path=path)
        target = self._target(req)
        for vm in await self.vms.list():
            used = [*vm.spec.disks, *([vm.spec.saved_state] if vm.spec.saved_state else [])]
            if any((d.datastore, d.path) == (datastore, path) for d in used):
                raise Conflict(f"{target} is a disk of VM {vm.name}: kept", vm=vm.name)
        existed = target.exists()
        target.unlink(missing_ok=True)
        return existed
