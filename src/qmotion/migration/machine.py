"""The live-migration state machine: a pure function from (state, event) to (state, action).

No I/O and no clock: the engine feeds it what happened and performs what it returns, and the
state is persisted in the task after every step, so a task always says where it stands.

    precheck -> prepare_destination [-> mirror] -> start_migration -> monitor
             -> verify_destination -> announce -> stop_source -> update_inventory -> done

A shared-nothing migration (``Begin(copy_disks=True)``) copies the disks first: the
destination prepares empty disks with its QEMU, the source mirrors into them (``mirror``,
polled until every disk is in sync and guest writes reach both copies), and only then does
RAM migrate; the disks end in sync at QEMU's switchover (the source agent's part). A rollback
from ``mirror`` on stops the mirror too; the destination's removal takes its new disks.

The switchover (QEMU reports ``completed``) is the point of no return. Before it, any failure or
a cancel rolls back: cancel QEMU's migration, tear the destination down, make sure the source
runs. After it the destination owns the VM; a destination that does not run is recovered by
resuming the source (it is paused with the complete state) and tearing the destination down.
A VM therefore runs on exactly one host before, during and after the migration.

Postcopy (only when the operator allowed it, and the ladder asked for it) moves the point of no
return earlier: once QEMU reports ``postcopy-*`` the destination runs the VM while the source
still holds the pages not yet sent. From then on nothing is rolled back or removed: a broken
stream pauses both ends (``postcopy-paused``) and is recovered (``RecoverPostcopy``) until QEMU
completes; a migration that cannot be recovered in time ends FAILED with both QEMUs kept.

A manager that restarts resumes each task from its persisted state (event ``Resumed``): one
that had changed nothing ends as failed, one between preparing the destination and QEMU's
confirmed start rolls back (what it did is not known for sure), and the others carry on where
they stood: the migration itself runs between the agents and does not need the manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
MONITOR_RETRIES = 3
# Attempts to resume a broken postcopy stream; the port spaces them (>= 2 s): a link down
# for minutes is waited out, one gone for good is left to the operator with both QEMUs.
POSTCOPY_RECOVERIES = 600


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
class Resumed:
    """The manager restarted; the task continues from its persisted state."""


Event = Begin | Succeeded | Failed | Progress | MirrorProgress | CancelRequested | Resumed


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
class VerifyDestination:
    pass


@dataclass(frozen=True)
class Announce:
    pass


@dataclass(frozen=True)
class StopSource:
    pass


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
    | VerifyDestination
    | Announce
    | StopSource
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


def _rollback(state: MigrationState, error: str | None) -> Step:
    new = replace(state, phase=Phase.ROLLBACK, error=state.error or error)
    return Step(new, _rollback_action(state), f"rolling back: {error}" if error else "rolling back")


def _rollback_action(state: MigrationState) -> Rollback:
    return Rollback(
        cancel_migration=state.started,
        teardown_destination=state.destination_made,
        stop_mirror=state.mirror_started,
    )


def _after_switchover_next(state: MigrationState) -> Step:
    order: dict[Phase, tuple[Phase, Action]] = {
        Phase.VERIFY: (Phase.ANNOUNCE, Announce()),
        Phase.ANNOUNCE: (Phase.STOP_SOURCE, StopSource()),
        Phase.STOP_SOURCE: (Phase.UPDATE, UpdateInventory()),
    }
    phase, action = order[state.phase]
    return Step(replace(state, phase=phase), action)


def step(state: MigrationState, event: Event) -> Step:
    """The next state and the action that gets there. Pure and total."""
    if state.terminal:
        return Step(state, Finish(state.phase), "already finished")

    if isinstance(event, CancelRequested):
        if state.switched_over or state.phase in (Phase.ROLLBACK, Phase.RECOVER):
            return Step(
                replace(state, cancel_requested=True),
                _repeat(state),
                "cancel ignored: too late, the switchover already happened"
                if state.switched_over
                else "cancel noted: already rolling back",
            )
        if state.phase in (Phase.PENDING, Phase.PRECHECK):
            return Step(
                replace(state, phase=Phase.CANCELLED, cancel_requested=True),
                Finish(Phase.CANCELLED),
                "cancelled before anything changed",
            )
        return _rollback(replace(state, cancel_requested=True), "cancelled by request")

    if isinstance(event, Resumed):
        return _resume(state)

    phase = state.phase
    if phase == Phase.PENDING:
        if isinstance(event, Begin):
            return Step(
                replace(state, phase=Phase.PRECHECK, copy_disks=event.copy_disks), RunPrechecks()
            )
        return Step(state, _repeat(state), "waiting to begin")

    if phase == Phase.PRECHECK:
        if isinstance(event, Succeeded):
            return Step(
                replace(state, phase=Phase.PREPARE, destination_made=True), PrepareDestination()
            )
        if isinstance(event, Failed):
            # Nothing was touched yet: refused, not rolled back.
            return Step(
                replace(state, phase=Phase.FAILED, error=event.error),
                Finish(Phase.FAILED),
                "refused by pre-checks",
            )

    if phase == Phase.PREPARE:
        if isinstance(event, Succeeded) and event.uri and state.copy_disks:
            return Step(
                replace(state, phase=Phase.MIRROR, uri=event.uri, mirror_started=True),
                MirrorDisks(),
                "copying the disks to the destination",
            )
        if isinstance(event, Succeeded) and event.uri:
            return Step(replace(state, phase=Phase.START, uri=event.uri), StartMigration(event.uri))
        if isinstance(event, Failed | Succeeded):
            error = event.error if isinstance(event, Failed) else "destination gave no address"
            return _rollback(state, error)

    if phase == Phase.MIRROR:
        if isinstance(event, MirrorProgress) and event.synced:
            return Step(
                replace(state, phase=Phase.START, monitor_failures=0),
                StartMigration(state.uri or ""),
                "every disk in sync: moving the memory",
            )
        if isinstance(event, MirrorProgress):
            return Step(replace(state, monitor_failures=0), MirrorDisks())
        if isinstance(event, Failed):
            again = _monitor_again(state, event)
            if again is not None:
                return Step(again.state, MirrorDisks(), again.note)
            return _rollback(state, event.error)

    if phase == Phase.START:
        if isinstance(event, Succeeded):
            return Step(
                replace(state, phase=Phase.MONITOR, started=True), AwaitProgress(known_status=None)
            )
        if isinstance(event, Failed):
            # migrate may have been issued even if its answer was lost.
            return _rollback(replace(state, started=True), event.error)

    if phase == Phase.MONITOR and (state.postcopy or _postcopy_event(event)):
        return _postcopy_step(state, event)

    if phase == Phase.MONITOR:
        if isinstance(event, Progress):
            status = event.qemu_status
            st = replace(state, qemu_status=status)
            if status == Qs.COMPLETED:
                return Step(
                    replace(st, phase=Phase.VERIFY, switched_over=True),
                    VerifyDestination(),
                    "switchover done",
                )
            if status in QEMU_FINISHED_BAD:
                reason = f"QEMU reported {status}" + (f": {event.error}" if event.error else "")
                return _rollback(replace(st, started=False), reason)
            return Step(st, AwaitProgress(known_status=status))
        if isinstance(event, Failed):
            # One lost answer is no reason to abandon a migration that may be fine.
            return _monitor_again(state, event) or _rollback(state, event.error)

    if phase == Phase.VERIFY:
        if isinstance(event, Succeeded):
            return _after_switchover_next(state)
        if isinstance(event, Failed) and state.postcopy:
            # The destination wrote to memory the source no longer has: resuming the source
            # would run a stale VM. Nothing is removed; the operator decides.
            error = (
                f"{event.error}; after postcopy the source's copy is stale, "
                "so neither QEMU was removed"
            )
            return Step(replace(state, phase=Phase.FAILED, error=error), Finish(Phase.FAILED))
        if isinstance(event, Failed):
            return Step(
                replace(state, phase=Phase.RECOVER, error=event.error),
                Recover(),
                "destination does not run: recovering on the source",
            )

    if phase in (Phase.ANNOUNCE, Phase.STOP_SOURCE):
        if isinstance(event, Failed):
            # The VM runs on the destination; what is left is reported, not undone.
            st = replace(state, warnings=(*state.warnings, f"{phase.value}: {event.error}"))
            return _after_switchover_next(st)
        if isinstance(event, Succeeded):
            return _after_switchover_next(state)

    if phase == Phase.UPDATE:
        if isinstance(event, Succeeded):
            return Step(replace(state, phase=Phase.DONE), Finish(Phase.DONE))
        if isinstance(event, Failed):
            st = replace(state, warnings=(*state.warnings, f"inventory: {event.error}"))
            return Step(replace(st, phase=Phase.DONE), Finish(Phase.DONE))

    if phase == Phase.ROLLBACK:
        if isinstance(event, Progress) and event.qemu_status in POSTCOPY:
            found = f"rollback ({state.error}) found the migration in postcopy"
            return Step(
                replace(
                    state,
                    phase=Phase.MONITOR,
                    started=True,
                    switched_over=True,
                    postcopy=True,
                    qemu_status=event.qemu_status,
                    error=None,
                    warnings=(*state.warnings, found),
                ),
                AwaitProgress(known_status=event.qemu_status),
                "in postcopy: going forward",
            )
        if isinstance(event, Progress) and event.qemu_status == Qs.COMPLETED:
            # The rollback found the switchover had happened: the destination owns the VM.
            # What caused the rollback did not stop the migration: a warning, not the error.
            why = (f"rollback ({state.error}) found the switchover done",) if state.error else ()
            return Step(
                replace(
                    state,
                    phase=Phase.VERIFY,
                    switched_over=True,
                    qemu_status=Qs.COMPLETED,
                    error=None,
                    warnings=(*state.warnings, *why),
                ),
                VerifyDestination(),
                "switchover had already happened: going forward",
            )
        final = Phase.CANCELLED if state.cancel_requested else Phase.FAILED
        if isinstance(event, Failed):
            st = replace(state, warnings=(*state.warnings, f"rollback: {event.error}"))
            return Step(replace(st, phase=Phase.FAILED), Finish(Phase.FAILED))
        if isinstance(event, Succeeded):
            return Step(replace(state, phase=final), Finish(final))

    if phase == Phase.RECOVER:
        if isinstance(event, Failed):
            st = replace(state, warnings=(*state.warnings, f"recover: {event.error}"))
            return Step(replace(st, phase=Phase.FAILED), Finish(Phase.FAILED))
        if isinstance(event, Succeeded):
            return Step(replace(state, phase=Phase.FAILED), Finish(Phase.FAILED))

    return Step(state, _repeat(state), f"ignored {type(event).__name__} in {phase.value}")


def _monitor_again(state: MigrationState, event: Failed) -> Step | None:
    """A failed progress poll asked again, while the retries last and asking can help."""
    if event.retryable and state.monitor_failures + 1 < MONITOR_RETRIES:
        return Step(
            replace(state, monitor_failures=state.monitor_failures + 1),
            AwaitProgress(known_status=state.qemu_status),
            f"progress unavailable, retrying: {event.error}",
        )
    return None


def _postcopy_event(event: Event) -> bool:
    return isinstance(event, Progress) and event.qemu_status in POSTCOPY


def _postcopy_step(state: MigrationState, event: Event) -> Step:
    """Monitoring once in postcopy: forward only."""
    st = replace(state, postcopy=True, switched_over=True, started=True)
    if isinstance(event, Progress):
        status = event.qemu_status
        st = replace(st, qemu_status=status, monitor_failures=0)
        if status == Qs.COMPLETED:
            return Step(replace(st, phase=Phase.VERIFY), VerifyDestination(), "postcopy done")
        if status in QEMU_FINISHED_BAD:
            error = (
                f"QEMU reported {status} in postcopy: the VM's memory is split between the "
                f"two hosts; neither QEMU was removed"
            )
            return Step(replace(st, phase=Phase.FAILED, error=error), Finish(Phase.FAILED))
        if status == Qs.POSTCOPY_PAUSED:
            return _recover_postcopy(st, "the postcopy stream broke")
        note = "postcopy: the destination runs" if not state.postcopy else ""
        return Step(st, AwaitProgress(known_status=status), note)
    if isinstance(event, Failed):
        # One lost answer (the management network, not the stream) is asked again first: a
        # recovery pauses the stream, which a healthy one should not pay for.
        return _monitor_again(st, event) or _recover_postcopy(
            replace(st, monitor_failures=0), event.error
        )
    # Succeeded: a recovery was issued; see where QEMU stands.
    return Step(st, AwaitProgress(known_status=st.qemu_status))


def _recover_postcopy(state: MigrationState, why: str) -> Step:
    if state.postcopy_recoveries >= POSTCOPY_RECOVERIES:
        error = (
            f"postcopy not recovered after {state.postcopy_recoveries} attempts ({why}); "
            "the VM waits on the destination for pages the source holds: both kept"
        )
        return Step(replace(state, phase=Phase.FAILED, error=error), Finish(Phase.FAILED))
    st = replace(state, postcopy_recoveries=state.postcopy_recoveries + 1)
    return Step(st, RecoverPostcopy(), f"recovering postcopy: {why}")


def _resume(state: MigrationState) -> Step:
    note = "resumed after a manager restart"
    if state.phase in (Phase.PENDING, Phase.PRECHECK):
        return Step(
            replace(state, phase=Phase.FAILED, error="the manager restarted before it began"),
            Finish(Phase.FAILED),
            "the manager restarted before anything changed",
        )
    if state.phase in (Phase.PREPARE, Phase.MIRROR, Phase.START):
        # The destination may exist and migrate may have been issued, answers unseen.
        st = replace(state, started=state.phase == Phase.START, destination_made=True)
        return _rollback(st, "the manager restarted while the migration was being set up")
    if state.phase == Phase.MONITOR:
        return Step(replace(state, monitor_failures=0), AwaitProgress(known_status=None), note)
    return Step(state, _repeat(state), note)


def _repeat(state: MigrationState) -> Action:
    """The action of the current phase again (for events that change nothing)."""
    phase = state.phase
    if phase == Phase.MONITOR:
        return AwaitProgress(known_status=state.qemu_status)
    if phase == Phase.ROLLBACK:
        return _rollback_action(state)
    simple: dict[Phase, Action] = {
        Phase.PENDING: RunPrechecks(),
        Phase.PRECHECK: RunPrechecks(),
        Phase.PREPARE: PrepareDestination(),
        Phase.MIRROR: MirrorDisks(),
        Phase.VERIFY: VerifyDestination(),
        Phase.ANNOUNCE: Announce(),
        Phase.STOP_SOURCE: StopSource(),
        Phase.UPDATE: UpdateInventory(),
        Phase.RECOVER: Recover(),
    }
    if phase == Phase.START:
        return StartMigration(state.uri or "")
    return simple.get(phase, Finish(phase))
