"""The live-migration state machine: a pure function from (state, event) to (state, action).

No I/O and no clock: the engine feeds it what happened and performs what it returns, and the
state is persisted in the task after every step, so a task always says where it stands.

    precheck -> prepare_destination [-> mirror] -> start_migration -> monitor
             -> verify_destination -> announce -> stop_source -> update_inventory -> done

Each phase has one handler (``HANDLERS``). Phases keep their persisted names; actions are named
as libvirt's steps, for what they commit: ``FinishDestination`` (in ``verify_destination``:
the destination runs, its copied disks its own), ``ConfirmSource`` (``stop_source``). The
state, the events and the actions are in ``vocabulary``.

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

A manager that restarts resumes each task from its persisted state (event ``Restarted``): one
that had changed nothing ends as failed, one between preparing the destination and QEMU's
confirmed start rolls back (what it did is not known for sure), and the others carry on where
they stood: the migration itself runs between the agents and does not need the manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from qmotion.api.migration import QemuMigrationStatus as Qs
from qmotion.migration.vocabulary import (
    POSTCOPY,
    QEMU_FINISHED_BAD,
    Action,
    Announce,
    AwaitProgress,
    Begin,
    CancelRequested,
    ConfirmSource,
    Event,
    Failed,
    Finish,
    FinishDestination,
    MigrationState,
    MirrorDisks,
    MirrorProgress,
    Phase,
    PrepareDestination,
    Progress,
    Recover,
    RecoverPostcopy,
    Restarted,
    Rollback,
    RunPrechecks,
    StartMigration,
    Step,
    Succeeded,
    UpdateInventory,
)

MONITOR_RETRIES = 3
# Attempts to resume a broken postcopy stream; the port spaces them (>= 2 s): a link down
# for minutes is waited out, one gone for good is left to the operator with both QEMUs.
POSTCOPY_RECOVERIES = 600


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
        Phase.ANNOUNCE: (Phase.STOP_SOURCE, ConfirmSource()),
        Phase.STOP_SOURCE: (Phase.UPDATE, UpdateInventory()),
    }
    phase, action = order[state.phase]
    return Step(replace(state, phase=phase), action)


def step(state: MigrationState, event: Event) -> Step:
    """The next state and the action that gets there. Pure and total."""
    if state.terminal:
        return Step(state, Finish(state.phase), "already finished")
    if isinstance(event, CancelRequested):
        return _cancel(state)
    if isinstance(event, Restarted):
        return _resume(state)
    handler = HANDLERS.get(state.phase)
    done = handler(state, event) if handler is not None else None
    if done is not None:
        return done
    return Step(state, _repeat(state), f"ignored {type(event).__name__} in {state.phase.value}")


def _cancel(state: MigrationState) -> Step:
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


def _pending(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Begin):
        return Step(
            replace(state, phase=Phase.PRECHECK, copy_disks=event.copy_disks), RunPrechecks()
        )
    return Step(state, _repeat(state), "waiting to begin")


def _precheck(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Succeeded):
        return Step(
            replace(state, phase=Phase.PREPARE, destination_made=True), PrepareDestination()
        )
    if isinstance(event, Failed):
        # Nothing was touched yet: refused, not rolled back.
        st = replace(state, phase=Phase.FAILED, error=event.error)
        return Step(st, Finish(Phase.FAILED), "refused by pre-checks")
    return None


def _prepare(state: MigrationState, event: Event) -> Step | None:
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
    return None


def _mirror(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, MirrorProgress) and event.synced:
        st = replace(state, phase=Phase.START, monitor_failures=0)
        return Step(st, StartMigration(state.uri or ""), "every disk in sync: moving the memory")
    if isinstance(event, MirrorProgress):
        return Step(replace(state, monitor_failures=0), MirrorDisks())
    if isinstance(event, Failed):
        again = _monitor_again(state, event)
        if again is not None:
            return Step(again.state, MirrorDisks(), again.note)
        return _rollback(state, event.error)
    return None


def _start(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Succeeded):
        return Step(
            replace(state, phase=Phase.MONITOR, started=True), AwaitProgress(known_status=None)
        )
    if isinstance(event, Failed):
        # migrate may have been issued even if its answer was lost.
        return _rollback(replace(state, started=True), event.error)
    return None


def _monitor(state: MigrationState, event: Event) -> Step | None:
    if state.postcopy or _postcopy_event(event):
        return _postcopy_step(state, event)
    if isinstance(event, Progress):
        status = event.qemu_status
        st = replace(state, qemu_status=status)
        if status == Qs.COMPLETED:
            st = replace(st, phase=Phase.VERIFY, switched_over=True)
            return Step(st, FinishDestination(), "switchover done")
        if status in QEMU_FINISHED_BAD:
            reason = f"QEMU reported {status}" + (f": {event.error}" if event.error else "")
            return _rollback(replace(st, started=False), reason)
        return Step(st, AwaitProgress(known_status=status))
    if isinstance(event, Failed):
        # One lost answer is no reason to abandon a migration that may be fine.
        return _monitor_again(state, event) or _rollback(state, event.error)
    return None


def _finish_destination(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Succeeded):
        return _after_switchover_next(state)
    if isinstance(event, Failed) and state.postcopy:
        # The destination wrote to memory the source no longer has: resuming the source
        # would run a stale VM. Nothing is removed; the operator decides.
        error = (
            f"{event.error}; after postcopy the source's copy is stale, so neither QEMU was removed"
        )
        return Step(replace(state, phase=Phase.FAILED, error=error), Finish(Phase.FAILED))
    if isinstance(event, Failed):
        st = replace(state, phase=Phase.RECOVER, error=event.error)
        return Step(st, Recover(), "destination does not run: recovering on the source")
    return None


def _after_finish(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Failed):
        # The VM runs on the destination; what is left is reported, not undone.
        st = replace(state, warnings=(*state.warnings, f"{state.phase.value}: {event.error}"))
        return _after_switchover_next(st)
    if isinstance(event, Succeeded):
        return _after_switchover_next(state)
    return None


def _update(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Succeeded):
        return Step(replace(state, phase=Phase.DONE), Finish(Phase.DONE))
    if isinstance(event, Failed):
        st = replace(state, warnings=(*state.warnings, f"inventory: {event.error}"))
        return Step(replace(st, phase=Phase.DONE), Finish(Phase.DONE))
    return None


def _rolling_back(state: MigrationState, event: Event) -> Step | None:
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
            FinishDestination(),
            "switchover had already happened: going forward",
        )
    final = Phase.CANCELLED if state.cancel_requested else Phase.FAILED
    if isinstance(event, Failed):
        st = replace(state, warnings=(*state.warnings, f"rollback: {event.error}"))
        return Step(replace(st, phase=Phase.FAILED), Finish(Phase.FAILED))
    if isinstance(event, Succeeded):
        return Step(replace(state, phase=final), Finish(final))
    return None


def _recovering(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Failed):
        st = replace(state, warnings=(*state.warnings, f"recover: {event.error}"))
        return Step(replace(st, phase=Phase.FAILED), Finish(Phase.FAILED))
    if isinstance(event, Succeeded):
        return Step(replace(state, phase=Phase.FAILED), Finish(Phase.FAILED))
    return None


# One handler per phase: the step for an event in it, or None (the event changes nothing).
HANDLERS: dict[Phase, Callable[[MigrationState, Event], Step | None]] = {
    Phase.PENDING: _pending,
    Phase.PRECHECK: _precheck,
    Phase.PREPARE: _prepare,
    Phase.MIRROR: _mirror,
    Phase.START: _start,
    Phase.MONITOR: _monitor,
    Phase.VERIFY: _finish_destination,
    Phase.ANNOUNCE: _after_finish,
    Phase.STOP_SOURCE: _after_finish,
    Phase.UPDATE: _update,
    Phase.ROLLBACK: _rolling_back,
    Phase.RECOVER: _recovering,
}


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
            return Step(replace(st, phase=Phase.VERIFY), FinishDestination(), "postcopy done")
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
        Phase.VERIFY: FinishDestination(),
        Phase.ANNOUNCE: Announce(),
        Phase.STOP_SOURCE: ConfirmSource(),
        Phase.UPDATE: UpdateInventory(),
        Phase.RECOVER: Recover(),
    }
    if phase == Phase.START:
        return StartMigration(state.uri or "")
    return simple.get(phase, Finish(phase))
