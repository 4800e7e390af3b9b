"""One VM's storage move as the agent keeps it: its record (``storage-move.json``) and the disk
files the record names, never deleted while QEMU has them open.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from pydantic import BaseModel

from qmotion.agent.disks.datastores import datastore
from qmotion.agent.errors import Conflict, SpecRejected
from qmotion.agent.vms.manager import VmManager
from qmotion.api.storage import CopyMode, MirrorPhase
from qmotion.api.vm import Disk
from qmotion.hypervisor.errors import HypervisorError

RECORD = "storage-move.json"


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
    # The target was opened past the page cache for the copy (reopened cached at the pivot).
    direct: bool = False


class MoveRecord(BaseModel):
    """What the agent persists of one VM's move (see ``qmotion.agent.disks.storage``)."""

    datastore: str
    phase: MirrorPhase
    copy_mode: CopyMode = "background"
    disks: list[MovedDisk]
    error: str | None = None


class MoveRecords:
    """The moves' records, one file in each VM's directory, and the disk files they name."""

    def __init__(self, vms: VmManager) -> None:
        self.vms = vms

    def _file(self, name: str) -> Path:
        return self.vms._dir(name) / RECORD

    def load(self, name: str) -> MoveRecord | None:
        path = self._file(name)
        if not path.is_file():
            return None
        return MoveRecord.model_validate_json(path.read_text())

    def save(self, name: str, rec: MoveRecord | None) -> None:
        path = self._file(name)
        if rec is None:
            path.unlink(missing_ok=True)
        else:
            self.vms._write(path, rec.model_dump_json(indent=2))

    def unresolved(self, name: str) -> str | None:
        """Why the VM must not be migrated, deleted or restarted now (None: nothing pending)."""
        try:
            rec = self.load(name)
        except (OSError, ValueError):
            return "its storage move record is unreadable"
        if rec is None or rec.phase in ("released", "aborted"):
            return None
        return f"its storage move to {rec.datastore} is {rec.phase}"

    async def open_files(self, name: str) -> set[str] | None:
        """Every file the VM's QEMU has open; None when QEMU does not answer (then nothing
        may be deleted: any file could be in use)."""
        try:
            nodes = await self.vms.monitor(name).execute("query-named-block-nodes", {"flat": True})
        except Conflict:
            return set()  # not running: QEMU holds nothing
        except HypervisorError:
            return None
        return {str(n.get("file")) for n in nodes if n.get("drv") == "file"}

    async def unlink(
        self, name: str, disk: Disk, open_files: set[str] | None
    ) -> tuple[str | None, str | None]:
        """Delete one disk file unless QEMU has it open: (removed, leftover)."""
        try:
            path = self.disk_path(disk, name)
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

    def disk_path(self, disk: Disk, vm: str) -> Path:
        return datastore(self.vms.config, disk.datastore, vm).path / disk.path

    def _remove_empty_folder(self, disk: Disk, vm: str) -> None:
        """The VM's folder on a datastore, once empty; never the datastore's root."""
        root = datastore(self.vms.config, disk.datastore, vm).path
        folder = (root / disk.path).parent
        if folder != root:
            with contextlib.suppress(OSError):
                folder.rmdir()
