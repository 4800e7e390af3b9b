"""The live-migration state machine: a pure function from (state, event) to (state, action).

No I/O and no clock: the engine feeds it what happened and performs what it returns, and the
state is persisted in the task after every step, so a task always says where it stands.

    precheck -> prepare_destination [-> mirror] -> start_migration -> monitor
             -> verify_destination -> announce -> stop_source -> update_inventory -> done

Each phase has one handler (``HANDLERS``). Phases keep their persisted names; actions are named
as libvirt's steps, for what they commit: ``FinishDestination`` (in ``verify_destination``:
the word that lets the paused destination run, then seeing it run), ``ConfirmSource``
(``stop_source``). The state, the events and the actions are in ``vocabulary``. Every agent
call of a migration carries its id (``migration_id``, given at ``Begin``): an agent answers
"completed" or "migrated away" only for that migration, never for an earlier one.

A shared-nothing migration (``Begin(copy_disks=True)``) copies the disks first: the
destination prepares empty disks with its QEMU, the source mirrors into them (``mirror``,
polled until every disk is in sync and guest writes reach both copies), and only then does
RAM migrate; the disks end in sync at QEMU's switchover (the source agent's part). A rollback
from ``mirror`` on stops the mirror too; the destination's removal takes its new disks.

The switchover (the source reports ``completed`` for this migration) is the point of no
return. Before it, any failure or a cancel rolls back: cancel QEMU's migration, make sure the
source runs, tear the destination down. After it the destination, started paused, is given the
word to run; once seen running (``destination_running``) it owns the VM and nothing undoes it:
a step that fails after that is retried with backoff (``attempts``, the action's ``after_s``)
and at worst the task ends ``confirmation_pending`` (the VM runs there, the inventory says so,
reconcile confirms the rest). Only when the destination agent itself says the VM does not run
there and cannot (``Failed(not_running=True)``) is the VM recovered on the source (resumed,
the destination removed by the id); a destination that cannot be reached is never given up
for one that might run: after the retries the task fails with nothing removed or resumed and
the VM marked for attention. A VM therefore never runs on two hosts, and never on none by the
manager's doing.

Postcopy (only when the operator allowed it, and the ladder asked for it) moves the point of no
return earlier: once QEMU reports ``postcopy-*`` the destination runs the VM while the source
still holds the pages not yet sent. From then on nothing is rolled back or removed: a broken
stream pauses both ends (``postcopy-paused``) and is recovered (``RecoverPostcopy``) until QEMU
completes; a migration that cannot be recovered in time ends FAILED with both QEMUs kept.
``postcopy_requested`` is persisted before postcopy is asked for, so a manager that restarts
knows the destination may run with pages still on the source.

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
    Retried,
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
# Past the switchover nothing is given up on one lost answer: the Finish step (the word and
# seeing the destination run) and the recovery are asked again this often, the steps after
# the destination ran this often, spaced by ``backoff``.
FINISH_RETRIES = 20
RECOVER_RETRIES = 20
# Before the switchover too: a rollback the source's agent did not confirm (it restarts, it
# drops off the network) is asked again, as the source's QEMU may still be migrating.
ROLLBACK_RETRIES = 20
RETRIES_AFTER_RUNNING = 8
# A recovery that finds the destination running after all goes back to Verify; if Verify
# then finds it not running again this often, the answers contradict each other for good.
MAX_REVERSALS = 3
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


def backoff(attempt: int) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): doubling, capped."""
    return float(min(BACKOFF_FIRST_S * 2.0 ** max(attempt - 1, 0), BACKOFF_MAX_S))


def _rollback(state: MigrationState, error: str | None) -> Step:
    new = replace(state, phase=Phase.ROLLBACK, error=state.error or error, attempts=0)
    return Step(new, _rollback_action(state), f"rolling back: {error}" if error else "rolling back")


def _rollback_action(state: MigrationState) -> Rollback:
    return Rollback(
        cancel_migration=state.started,
        # A destination seen running owns the VM: never torn down (the machine never rolls
        # back then; this keeps the action honest whatever state it is built from).
        teardown_destination=state.destination_made and not state.destination_running,
        stop_mirror=state.mirror_started,
    )


def _after_switchover_next(state: MigrationState) -> Step:
    order: dict[Phase, tuple[Phase, Action]] = {
        Phase.VERIFY: (Phase.ANNOUNCE, Announce()),
        Phase.ANNOUNCE: (Phase.STOP_SOURCE, ConfirmSource()),
        Phase.STOP_SOURCE: (Phase.UPDATE, UpdateInventory()),
    }
    phase, action = order[state.phase]
    return Step(replace(state, phase=phase, attempts=0), action)


def _failed(state: MigrationState, error: str, attention: str | None = None) -> Step:
    """The task ends failed; ``attention``: what is not settled (the VM is marked)."""
    st = replace(state, phase=Phase.FAILED, error=error, attention=attention or state.attention)
    return Step(st, Finish(Phase.FAILED))


def _again(state: MigrationState, action: type[Retried], limit: int, why: str) -> Step | None:
    """The current phase's action once more after a backoff, while ``limit`` lasts."""
    attempt = state.attempts + 1
    if attempt > limit:
        return None
    wait = backoff(attempt)
    return Step(
        replace(state, attempts=attempt),
        action(after_s=wait),
        f"{state.phase.value}: retry {attempt}/{limit} in {wait:g} s: {why}",
    )


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
        st = replace(
            state,
            phase=Phase.PRECHECK,
            copy_disks=event.copy_disks,
            migration_id=state.migration_id or event.migration_id,
        )
        return Step(st, RunPrechecks())
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
    if isinstance(event, Progress) and event.postcopy_requested:
        state = replace(state, postcopy_requested=True)
    if state.postcopy or _postcopy_event(event):
        return _postcopy_step(state, event)
    if isinstance(event, Progress):
        status = event.qemu_status
        st = replace(state, qemu_status=status)
        if status == Qs.COMPLETED:
            st = replace(st, phase=Phase.VERIFY, switched_over=True, attempts=0)
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
        return _after_switchover_next(replace(state, destination_running=True))
    if not isinstance(event, Failed):
        return None
    if event.not_running and not state.destination_running and state.postcopy:
        # The destination wrote to memory the source no longer has: resuming the source
        # would run a stale VM. Nothing is removed; the operator decides.
        error = f"{event.error}; after postcopy the source's copy is stale, neither QEMU removed"
        return _failed(state, error, f"migration failed after postcopy: {event.error}")
    if event.not_running and not state.destination_running:
        st = replace(state, phase=Phase.RECOVER, error=event.error, attempts=0)
        return Step(st, Recover(), "the destination does not run: recovering on the source")
    # Unreachable, an error, a destination that does not start yet: it may run, or run any
    # moment; nothing is removed or resumed on a guess.
    again = _again(state, FinishDestination, FINISH_RETRIES, event.error)
    if again is not None:
        return again
    why = f"switchover unconfirmed: {event.error}"
    return _failed(state, f"{why}; nothing was removed or resumed", why)


def _after_finish(state: MigrationState, event: Event) -> Step | None:
    """announce and stop_source: the VM runs on the destination, whatever happens here."""
    if isinstance(event, Succeeded):
        return _after_switchover_next(state)
    if not isinstance(event, Failed):
        return None
    action = Announce if state.phase == Phase.ANNOUNCE else ConfirmSource
    again = _again(state, action, RETRIES_AFTER_RUNNING, event.error) if event.retryable else None
    if again is not None:
        return again
    warning = f"{state.phase.value}: {event.error}"
    st = replace(state, warnings=(*state.warnings, warning), unconfirmed=True)
    return _after_switchover_next(st)


def _update(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Failed):
        again = _again(state, UpdateInventory, RETRIES_AFTER_RUNNING, event.error)
        if again is not None:
            return again
        state = replace(
            state, warnings=(*state.warnings, f"inventory: {event.error}"), unconfirmed=True
        )
    elif not isinstance(event, Succeeded):
        return None
    if state.unconfirmed:
        pending = "; ".join(state.warnings) or "not confirmed"
        st = replace(
            state,
            phase=Phase.CONFIRM_PENDING,
            attempts=0,
            attention=f"destination runs, confirmation pending: {pending}",
        )
        return Step(st, Finish(Phase.CONFIRM_PENDING), "the destination runs; confirmation pending")
    return Step(replace(state, phase=Phase.DONE, attempts=0), Finish(Phase.DONE))


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
                attempts=0,
            ),
            FinishDestination(),
            "switchover had already happened: going forward",
        )
    final = Phase.CANCELLED if state.cancel_requested else Phase.FAILED
    if isinstance(event, Failed) and event.retryable and state.attempts < ROLLBACK_RETRIES:
        attempt = state.attempts + 1
        wait = backoff(attempt)
        return Step(
            replace(state, attempts=attempt),
            replace(_rollback_action(state), after_s=wait),
            f"rollback: retry {attempt}/{ROLLBACK_RETRIES} in {wait:g} s: {event.error}",
        )
    if isinstance(event, Failed):
        st = replace(state, warnings=(*state.warnings, f"rollback: {event.error}"))
        # The source could not be confirmed running: where the VM runs is not certain.
        st = replace(st, attention=f"rollback not confirmed: {event.error}")
        return Step(replace(st, phase=Phase.FAILED), Finish(Phase.FAILED))
    if isinstance(event, Succeeded):
        return Step(replace(state, phase=final), Finish(final))
    return None


def _recovering(state: MigrationState, event: Event) -> Step | None:
    if isinstance(event, Progress) and event.qemu_status == Qs.COMPLETED:
        if state.reversals >= MAX_REVERSALS:
            why = (
                f"the destination was reported running and not running {state.reversals + 1} "
                "times: neither QEMU removed or resumed"
            )
            return _failed(state, f"{state.error}; {why}", why)
        # Asked again, the destination runs after all: it owns the VM.
        st = replace(
            state, phase=Phase.VERIFY, error=None, attempts=0, reversals=state.reversals + 1
        )
        return Step(st, FinishDestination(), "the destination runs after all: going forward")
    if isinstance(event, Progress) and event.qemu_status in POSTCOPY:
        why = f"recover found the migration in {event.qemu_status}"
        return _failed(state, f"{state.error}; {why}: neither QEMU removed", why)
    if isinstance(event, Succeeded):
        # The source runs again (it held the complete state); the migration failed.
        return Step(replace(state, phase=Phase.FAILED, attempts=0), Finish(Phase.FAILED))
    if not isinstance(event, Failed):
        return None
    again = _again(state, Recover, RECOVER_RETRIES, event.error) if event.retryable else None
    if again is not None:
        return again
    st = replace(state, warnings=(*state.warnings, f"recover: {event.error}"))
    return _failed(st, state.error or event.error, f"recover not completed: {event.error}")


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
            st = replace(st, phase=Phase.VERIFY, attempts=0)
            return Step(st, FinishDestination(), "postcopy done")
        if status in QEMU_FINISHED_BAD:
            error = (
                f"QEMU reported {status} in postcopy: the VM's memory is split between the "
                f"two hosts; neither QEMU was removed"
            )
            return _failed(st, error, error)
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
        return _failed(state, error, error)
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
