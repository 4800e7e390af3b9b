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

TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED, Phase.CONFIRM_PENDING})
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
    # The id every agent call of this migration carries (uuid4 hex, made at submission).
    migration_id: str | None = None
    # The destination was seen running: it owns the VM from then on, nothing undoes it.
    destination_running: bool = False
    # Postcopy was asked for (persisted before the asking): the destination may run the VM
    # with pages still on the source, so the source's copy may be stale.
    postcopy_requested: bool = False
    attempts: int = 0  # retries of the current phase's action
    # Times a recovery found the destination running after all and went back to Verify:
    # bounded, so two agents contradicting each other end in attention, not in a loop.
    reversals: int = 0
    unconfirmed: bool = False  # past the switchover, a step that could not be confirmed
    # Why the VM needs an operator (or reconcile) when the task ends, if it does.
    attention: str | None = None

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
            "migration_id": self.migration_id,
            "destination_running": self.destination_running,
            "postcopy_requested": self.postcopy_requested,
            "attempts": self.attempts,
            "reversals": self.reversals,
            "unconfirmed": self.unconfirmed,
            "attention": self.attention,
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
            migration_id=data.get("migration_id"),
            destination_running=data.get("destination_running", False),
            postcopy_requested=data.get("postcopy_requested", False),
            attempts=data.get("attempts", 0),
            reversals=data.get("reversals", 0),
            unconfirmed=data.get("unconfirmed", False),
            attention=data.get("attention"),
        )


# ---------------------------------------------------------------- events (what happened)


@dataclass(frozen=True)
class Begin:
    copy_disks: bool = False  # shared-nothing: mirror the disks before RAM
    migration_id: str | None = None  # the id the task was given at submission


@dataclass(frozen=True)
class Succeeded:
    """The action of the current phase succeeded; ``uri`` for prepare_destination."""

    uri: str | None = None


@dataclass(frozen=True)
class Failed:
    error: str
    retryable: bool = True  # False: a timeout or stall, asking again cannot help
    # The destination agent itself said the VM does not run there and cannot (not found,
    # QEMU stopped or crashed, its incoming migration failed): the only failure of the
    # Finish step that lets a recovery on the source begin.
    not_running: bool = False


@dataclass(frozen=True)
class Progress:
    """QEMU's migration status as the source reports it."""

    qemu_status: Qs
    error: str | None = None  # why QEMU's migration failed or was cancelled, if it says
    postcopy_requested: bool = False  # the port asked QEMU for postcopy (persisted already)


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
    """The word to the paused destination, then seeing it run (it then owns the VM)."""

    after_s: float = 0.0  # the engine waits this long first (a retry's backoff)


@dataclass(frozen=True)
class Announce:
    """The destination announces the VM and is told it is confirmed there (keep-disks)."""

    after_s: float = 0.0


@dataclass(frozen=True)
class ConfirmSource:
    """The source lets the VM go: its QEMU ends (past the switchover, never undone)."""

    after_s: float = 0.0


@dataclass(frozen=True)
class UpdateInventory:
    after_s: float = 0.0


@dataclass(frozen=True)
class Rollback:
    cancel_migration: bool
    teardown_destination: bool
    stop_mirror: bool = False
    after_s: float = 0.0  # a retry's backoff (the source's QEMU may still be migrating)


@dataclass(frozen=True)
class Recover:
    """After switchover the destination agent said the VM does not run there: remove that
    destination (by the id), resume the source (which holds the complete state)."""

    after_s: float = 0.0


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


Retried = FinishDestination | Announce | ConfirmSource | UpdateInventory | Recover
RETRIED = (FinishDestination, Announce, ConfirmSource, UpdateInventory, Recover, Rollback)


def delay_of(action: Action) -> float:
    """How long the engine waits before performing ``action``: a retry's backoff."""
    return action.after_s if isinstance(action, RETRIED) else 0.0
