"""The live-migration machine's vocabulary: its persisted state, events in, actions out.

Data only: ``machine.step`` maps a state and an event to a ``Step`` (the next state and the
action); the engine performs the action and feeds its outcome back as the next event. The
state's JSON form is what a task persists after every step: its keys and values are a stored
format, read back by a restarted manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmotion.api.migration import MigrationPhase
from qmotion.api.migration import QemuMigrationStatus as Qs

# One enum for the machine and the API: a task's phase is the machine's phase.
Phase = MigrationPhase

TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})
QEMU_FINISHED_BAD = frozenset({Qs.FAILED, Qs.CANCELLED})
POSTCOPY_RUNNING = frozenset(
    {Qs.POSTCOPY_DEVICE, Qs.POSTCOPY_ACTIVE, Qs.POSTCOPY_RECOVER_SETUP, Qs.POSTCOPY_RECOVER}
)
POSTCOPY = POSTCOPY_RUNNING | {Qs.POSTCOPY_PAUSED}


@dataclass(frozen=True)
class MigrationState:
    phase: Phase = Phase.PENDING
    uri: str | None = None
    started: bool = False  # QEMU's migrate was issued: a rollback must cancel it
    destination_made: bool = False  # the destination QEMU may exist: a rollback removes it
    switched_over: bool = False
    cancel_requested: bool = False
    error: str | None = None
    warnings: tuple[str, ...] = ()
    qemu_status: Qs | None = None
    monitor_failures: int = 0
    postcopy: bool = False  # QEMU switched to postcopy: the destination runs, nothing undone
    postcopy_recoveries: int = 0
    copy_disks: bool = False  # shared-nothing: the disks are mirrored before RAM moves
    mirror_started: bool = False  # the source may be mirroring: a rollback stops it

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "uri": self.uri,
            "started": self.started,
            "destination_made": self.destination_made,
            "switched_over": self.switched_over,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            "warnings": list(self.warnings),
            "qemu_status": self.qemu_status.value if self.qemu_status else None,
            "postcopy": self.postcopy,
            "postcopy_recoveries": self.postcopy_recoveries,
            "copy_disks": self.copy_disks,
            "mirror_started": self.mirror_started,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MigrationState:
        return cls(
            phase=Phase(data["phase"]),
            uri=data.get("uri"),
            started=data.get("started", False),
            destination_made=data.get("destination_made", False),
            switched_over=data.get("switched_over", False),
            cancel_requested=data.get("cancel_requested", False),
            error=data.get("error"),
            warnings=tuple(data.get("warnings", ())),
            qemu_status=Qs(data["qemu_status"]) if data.get("qemu_status") else None,
            postcopy=data.get("postcopy", False),
            postcopy_recoveries=data.get("postcopy_recoveries", 0),
            copy_disks=data.get("copy_disks", False),
            mirror_started=data.get("mirror_started", False),
        )


# ---------------------------------------------------------------- events (what happened)


@dataclass(frozen=True)
class Begin:
    copy_disks: bool = False  # shared-nothing: mirror the disks before RAM


@dataclass(frozen=True)
class Succeeded:
    """The action of the current phase succeeded; ``uri`` for prepare_destination."""

    uri: str | None = None


@dataclass(frozen=True)
class Failed:
    error: str
    retryable: bool = True  # False: a timeout or stall, asking again cannot help


@dataclass(frozen=True)
class Progress:
    """QEMU's migration status as the source reports it."""

    qemu_status: Qs
    error: str | None = None  # why QEMU's migration failed or was cancelled, if it says


@dataclass(frozen=True)
class MirrorProgress:
    """The disk mirror's state: ``synced`` once every disk is in sync, writes reaching both."""

    synced: bool


@dataclass(frozen=True)
class CancelRequested:
    pass


@dataclass(frozen=True)
class Restarted:
    """The manager restarted; the task continues from its persisted state."""


Event = Begin | Succeeded | Failed | Progress | MirrorProgress | CancelRequested | Restarted


# ---------------------------------------------------------------- actions (what to do)


@dataclass(frozen=True)
class RunPrechecks:
    pass


@dataclass(frozen=True)
class PrepareDestination:
    pass


@dataclass(frozen=True)
class MirrorDisks:
    """Start mirroring the disks into the destination's, or report how far it got."""


@dataclass(frozen=True)
class StartMigration:
    uri: str


@dataclass(frozen=True)
class AwaitProgress:
    known_status: Qs | None


@dataclass(frozen=True)
class FinishDestination:
    """The destination runs the VM (else recover on the source); its copied disks are its own."""


@dataclass(frozen=True)
class Announce:
    pass


@dataclass(frozen=True)
class ConfirmSource:
    """The source lets the VM go: its QEMU ends (past the switchover, never undone)."""


@dataclass(frozen=True)
class UpdateInventory:
    pass


@dataclass(frozen=True)
class Rollback:
    cancel_migration: bool
    teardown_destination: bool
    stop_mirror: bool = False


@dataclass(frozen=True)
class Recover:
    """After switchover the destination does not run: resume the source, remove the other."""


@dataclass(frozen=True)
class RecoverPostcopy:
    """The postcopy stream broke (or stalled): pause both ends and resume the stream."""


@dataclass(frozen=True)
class Finish:
    phase: Phase


Action = (
    RunPrechecks
    | PrepareDestination
    | MirrorDisks
    | StartMigration
    | AwaitProgress
    | FinishDestination
    | Announce
    | ConfirmSource
    | UpdateInventory
    | Rollback
    | Recover
    | RecoverPostcopy
    | Finish
)


@dataclass(frozen=True)
class Step:
    state: MigrationState
    action: Action
    note: str = field(default="")
