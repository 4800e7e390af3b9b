"""A VM's record of its live migrations (``migration.json``): which one its QEMU's status is.

QEMU's ``query-migrate`` says how *a* migration went, never which one: a QEMU that arrived by
migration (or resumed from a saved state) reports ``completed`` until it sends a stream of its
own, and a source keeps the ``completed`` of its last stream. The record names, by the
manager's id, the last outgoing migration issued here (written before QMP ``migrate``) and the
migration the VM arrived by (until the manager confirms it runs here), so that the agent
answers for that id only. It lives in the VM's directory and goes with it; it survives an
agent restart, as QEMU does.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)
RECORD = "migration.json"


class OutgoingRecord(BaseModel):
    id: str | None = None
    uri: str
    issued_at: float  # wall clock: it outlives the agent
    # The stream entered postcopy: this copy lacks what the destination wrote since, so it is
    # never resumed (persisted: an agent restarted later must know it too).
    postcopy: bool = False


class IncomingRecord(BaseModel):
    id: str | None = None
    # The word that the source completed came: the destination runs once its stream is loaded.
    finish: bool = False
    # paused: QEMU was started with -S and runs only on the word; auto: it runs by itself.
    start: Literal["paused", "auto"] = "auto"
    # The guest ran here (written before the agent's ``cont``, or seen resuming by itself): it
    # may have written to disks the source shares, so this copy is never torn down as a
    # failed destination, even once it stopped, and the source is never resumed over it.
    ran: bool = False
    # The source host's addresses, the only ones its peer calls are taken from (empty: any).
    source: list[str] = []


class MigrationRecord(BaseModel):
    outgoing: OutgoingRecord | None = None
    incoming: IncomingRecord | None = None
    # The migration the VM arrived by, once the manager confirmed it here: its figures (the
    # switchover's marks) are still that migration's until the VM sends a stream of its own.
    arrived: str | None = None

    @property
    def current(self) -> str | None:
        """The migration this QEMU's ``query-migrate`` belongs to. An arrival makes a fresh
        definition here, so an outgoing record is always later than the incoming one."""
        if self.outgoing is not None:
            return self.outgoing.id
        return self.incoming.id if self.incoming is not None else self.arrived


def outgoing_status(qemu_status: str, run_state: str | None) -> str:
    """QEMU's status of the recorded outgoing migration, as the manager may read it: it
    completed only if QEMU is in ``postmigrate`` (the guest left with that stream). A
    ``completed`` while the switchover still ends (``finish-migrate``) is the device state;
    with the guest running or paused here it is an arrival's or a resume's, and the recorded
    migration did not happen (failed)."""
    if qemu_status != "completed" or run_state == "postmigrate":
        return qemu_status
    return "device" if run_state == "finish-migrate" else "failed"


class MigrationRecords:
    """The records of this host's VMs, read once from disk and written atomically."""

    def __init__(self, vms_dir: Path) -> None:
        self.vms_dir = vms_dir
        self._cache: dict[str, MigrationRecord] = {}

    def get(self, name: str) -> MigrationRecord:
        rec = self._cache.get(name)
        if rec is None:
            rec = self._cache[name] = self._read(name)
        return rec

    def _read(self, name: str) -> MigrationRecord:
        path = self.vms_dir / name / RECORD
        try:
            return MigrationRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            return MigrationRecord()
        except (OSError, ValidationError) as exc:
            # Answered as "no migration here": every id rule then refuses (never a resume,
            # release or delete on a guess).
            log.error("unreadable migration record %s: %s", path, exc)
            return MigrationRecord()

    def _save(self, name: str, rec: MigrationRecord) -> None:
        """Written under a new name, then renamed; the VM's directory must exist (a record
        never recreates the directory of a VM that was deleted meanwhile)."""
        path = self.vms_dir / name / RECORD
        tmp = path.with_name(f".{RECORD}.tmp")
        tmp.write_text(rec.model_dump_json(indent=2))
        os.replace(tmp, path)
        self._cache[name] = rec

    def begin_outgoing(self, name: str, migration: str | None, uri: str) -> None:
        """Before QMP ``migrate``: the next ``completed`` of this QEMU is this migration's."""
        out = OutgoingRecord(id=migration, uri=uri, issued_at=time.time())
        self._save(name, self.get(name).model_copy(update={"outgoing": out}))

    def went_postcopy(self, name: str) -> None:
        rec = self.get(name)
        if rec.outgoing is not None and not rec.outgoing.postcopy:
            out = rec.outgoing.model_copy(update={"postcopy": True})
            self._save(name, rec.model_copy(update={"outgoing": out}))

    def begin_incoming(
        self,
        name: str,
        migration: str | None,
        start: Literal["paused", "auto"],
        source: list[str] | None = None,
    ) -> None:
        """Before the destination's QEMU starts."""
        inc = IncomingRecord(id=migration, start=start, source=source or [])
        self._save(name, MigrationRecord(incoming=inc))

    def remember_finish(self, name: str) -> None:
        rec = self.get(name)
        if rec.incoming is not None and not rec.incoming.finish:
            inc = rec.incoming.model_copy(update={"finish": True})
            self._save(name, rec.model_copy(update={"incoming": inc}))

    def mark_ran(self, name: str) -> None:
        """Before the agent lets the destination's guest run (or as soon as it ran by
        itself): from now on this copy may hold writes the source lacks."""
        rec = self.get(name)
        if rec.incoming is not None and not rec.incoming.ran:
            inc = rec.incoming.model_copy(update={"ran": True})
            self._save(name, rec.model_copy(update={"incoming": inc}))

    def confirm_incoming(self, name: str) -> None:
        """The manager saw the VM run here: it is simply here now."""
        rec = self.get(name)
        if rec.incoming is not None:
            self._save(name, rec.model_copy(update={"incoming": None, "arrived": rec.incoming.id}))

    def clear(self, name: str) -> None:
        """A VM newly defined here: a record a namesake left (a directory not fully
        removed) is not its."""
        (self.vms_dir / name / RECORD).unlink(missing_ok=True)
        self._cache.pop(name, None)

    def forget(self, name: str) -> None:
        """The VM was deleted (its directory, and the file with it, are gone)."""
        self._cache.pop(name, None)
