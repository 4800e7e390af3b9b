"""The migration state machine, alone: its paths, and properties over any event sequence."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.api.migration import QemuMigrationStatus as Qs
from qmotion.migration.machine import (
    FINISH_RETRIES,
    MAX_REVERSALS,
    RETRIES_AFTER_RUNNING,
    step,
)
from qmotion.migration.vocabulary import (
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
    Restarted,
    Rollback,
    RunPrechecks,
    StartMigration,
    Step,
    Succeeded,
    UpdateInventory,
    delay_of,
)


def run(events: list[Event]) -> list[Step]:
    steps, state = [], MigrationState()
    for ev in events:
        s = step(state, ev)
        steps.append(s)
        state = s.state
    return steps


def test_happy_path() -> None:
    steps = run(
        [
            Begin(),
            Succeeded(),
            Succeeded(uri="tcp:198.18.1.12:4444"),
            Succeeded(),
            Progress(Qs.ACTIVE),
            Progress(Qs.ACTIVE),
            Progress(Qs.COMPLETED),
            Succeeded(),
            Succeeded(),
            Succeeded(),
            Succeeded(),
        ]
    )
    actions = [type(s.action) for s in steps]
    assert actions == [
        RunPrechecks,
        PrepareDestination,
        StartMigration,
        AwaitProgress,
        AwaitProgress,
        AwaitProgress,
        FinishDestination,
        Announce,
        ConfirmSource,
        UpdateInventory,
        Finish,
    ]
    assert steps[-1].state.phase == Phase.DONE
    assert steps[2].action == StartMigration("tcp:198.18.1.12:4444")


def test_refused_prechecks_touch_nothing() -> None:
    steps = run([Begin(), Failed("VM is stopped")])
    assert steps[-1].action == Finish(Phase.FAILED)
    assert not any(isinstance(s.action, Rollback) for s in steps)


def test_lost_progress_answers_are_retried_then_rolled_back() -> None:
    start: list[Event] = [Begin(), Succeeded(), Succeeded(uri="tcp:x:1"), Succeeded()]
    steps = run([*start, Failed("timeout")])
    assert isinstance(steps[-1].action, AwaitProgress)
    steps = run([*start, Failed("t"), Failed("t"), Failed("t")])
    assert isinstance(steps[-1].action, Rollback)


def test_rollback_that_finds_a_switchover_goes_forward() -> None:
    start: list[Event] = [Begin(), Succeeded(), Succeeded(uri="tcp:x:1"), Succeeded()]
    steps = run([*start, Failed("t"), Failed("t"), Failed("t"), Progress(Qs.COMPLETED)])
    assert steps[-1].action == FinishDestination()
    assert steps[-1].state.switched_over


def test_destination_failure_rolls_back_and_fails() -> None:
    steps = run([Begin(), Succeeded(), Succeeded(uri="tcp:x:1"), Succeeded(), Progress(Qs.FAILED)])
    assert steps[-1].action == Rollback(cancel_migration=False, teardown_destination=True)
    final = step(steps[-1].state, Succeeded())
    assert final.state.phase == Phase.FAILED


def test_cancel_while_monitoring_cancels_qemu_and_ends_cancelled() -> None:
    steps = run(
        [
            Begin(),
            Succeeded(),
            Succeeded(uri="tcp:x:1"),
            Succeeded(),
            Progress(Qs.ACTIVE),
            CancelRequested(),
            Succeeded(),
        ]
    )
    assert steps[-2].action == Rollback(cancel_migration=True, teardown_destination=True)
    assert steps[-1].state.phase == Phase.CANCELLED


def test_cancel_after_switchover_is_ignored() -> None:
    steps = run(
        [
            Begin(),
            Succeeded(),
            Succeeded(uri="tcp:x:1"),
            Succeeded(),
            Progress(Qs.COMPLETED),
            CancelRequested(),
        ]
    )
    assert steps[-1].action == FinishDestination()
    assert steps[-1].state.switched_over


def test_destination_not_running_after_switchover_recovers_on_source() -> None:
    steps = run(
        [
            Begin(),
            Succeeded(),
            Succeeded(uri="tcp:x:1"),
            Succeeded(),
            Progress(Qs.COMPLETED),
            # The destination agent itself said so (issue 22: only that lets a recovery begin).
            Failed("destination crashed", retryable=False, not_running=True),
        ]
    )
    assert steps[-1].action == Recover()
    assert step(steps[-1].state, Succeeded()).state.phase == Phase.FAILED


def test_stop_source_failure_is_a_warning_not_a_rollback() -> None:
    """Issue 22: past the switchover a failure is retried with backoff (one lost answer costs
    nothing), and one that lasts ends ``confirmation_pending``: the VM runs on the
    destination, a warning, never a rollback or a recovery."""
    to_stop: list[Event] = [
        Begin(),
        Succeeded(),
        Succeeded(uri="tcp:x:1"),
        Succeeded(),
        Progress(Qs.COMPLETED),
        Succeeded(),
        Succeeded(),
    ]
    once = run([*to_stop, Failed("agent gone"), Succeeded(), Succeeded()])
    assert once[-3].action == ConfirmSource(after_s=0.5)
    assert once[-1].state.phase == Phase.DONE and not once[-1].state.warnings
    steps = run([*to_stop, *[Failed("agent gone")] * (RETRIES_AFTER_RUNNING + 1), Succeeded()])
    assert steps[-1].state.phase == Phase.CONFIRM_PENDING
    assert any("stop_source" in w for w in steps[-1].state.warnings)
    assert "confirmation pending" in (steps[-1].state.attention or "")
    assert not any(isinstance(s.action, Rollback | Recover) for s in steps)


def test_state_roundtrips_through_json() -> None:
    steps = run([Begin(), Succeeded(), Succeeded(uri="tcp:x:1")])
    st_ = steps[-1].state
    assert MigrationState.from_json(st_.to_json()) == st_


events = st.one_of(
    st.builds(Begin, st.booleans(), st.sampled_from([None, "0" * 32])),
    st.builds(MirrorProgress, st.booleans()),
    st.just(Succeeded()),
    st.just(Succeeded(uri="tcp:h:1")),
    st.builds(Failed, st.sampled_from(["boom", "agent gone"])),
    # The destination agent's own "it does not run here", and failures asking cannot help.
    st.builds(Failed, st.just("gone"), st.booleans(), st.booleans()),
    st.builds(
        Progress,
        st.sampled_from(
            [
                "setup",
                "active",
                "device",
                "completed",
                "failed",
                "cancelled",
                "postcopy-active",
                "postcopy-paused",
            ]
        ),
        st.none(),
        st.booleans(),
    ),
    st.just(CancelRequested()),
    st.just(Restarted()),
)


@settings(max_examples=400)
@given(st.lists(events, max_size=40))
def test_invariants_over_any_event_sequence(seq: list[Event]) -> None:
    state = MigrationState()
    for ev in seq:
        before = state
        s = step(state, ev)
        state = s.state
        if before.terminal:
            # Terminal states absorb everything.
            assert state == before and isinstance(s.action, Finish)
        if state.switched_over:
            # Past the point of no return nothing may undo the destination.
            assert not isinstance(s.action, Rollback)
        if isinstance(s.action, ConfirmSource):
            assert state.switched_over
        if isinstance(s.action, Rollback):
            assert not state.switched_over
            assert s.action.teardown_destination == state.destination_made
            # A mirror that may run is stopped before its destination goes.
            assert s.action.stop_mirror == state.mirror_started
        if isinstance(s.action, StartMigration) and state.copy_disks:
            # Memory moves only once the disks are in sync.
            synced = isinstance(ev, MirrorProgress) and ev.synced
            assert synced or before.phase == Phase.START, (before, ev)
        if isinstance(s.action, MirrorDisks):
            assert state.copy_disks and state.mirror_started
        if before.switched_over:
            assert state.switched_over
        # Issue 22: a destination seen running owns the VM.
        if before.destination_running:
            assert state.destination_running
            assert state.phase != Phase.RECOVER and not isinstance(s.action, Recover)
            if isinstance(s.action, Rollback):
                assert not s.action.teardown_destination
        if isinstance(s.action, Recover) and before.phase != Phase.RECOVER:
            # Only the destination agent's own word that the VM does not run there.
            assert isinstance(ev, Failed) and ev.not_running, (before, ev)
        if state.phase == Phase.CONFIRM_PENDING:
            assert state.destination_running and state.attention
        if state.phase == Phase.FAILED and before.phase != Phase.FAILED and before.switched_over:
            # Failed past the switchover: settled only by a completed recovery, else marked.
            recovered = before.phase == Phase.RECOVER and isinstance(ev, Succeeded)
            assert recovered or state.attention, (before, ev)
        assert 0.0 <= delay_of(s.action) <= 30.0
        assert state.attempts <= 20
        assert state.migration_id == (before.migration_id or state.migration_id)


@settings(max_examples=200)
@given(st.lists(events, max_size=30))
def test_always_reaches_an_end(seq: list[Event]) -> None:
    """Whatever happened, feeding successes (and QEMU's completion) terminates quickly."""
    state = MigrationState()
    for ev in seq:
        state = step(state, ev).state
    for _ in range(20):
        if state.terminal:
            break
        nxt = step(state, Succeeded(uri="tcp:h:1"))
        if nxt.state == state and isinstance(nxt.action, AwaitProgress):
            nxt = step(state, Progress(Qs.COMPLETED))
        elif nxt.state == state and isinstance(nxt.action, MirrorDisks):
            nxt = step(state, MirrorProgress(synced=True))
        elif state.phase == Phase.PENDING:
            nxt = step(state, Begin())
        state = nxt.state
    assert state.terminal


def test_resume_after_a_manager_restart() -> None:
    def at(phase: Phase, **kw: object) -> MigrationState:
        return MigrationState(phase=phase, **kw)  # type: ignore[arg-type]

    # Nothing changed yet: ends, failed, with nothing to undo.
    s = step(at(Phase.PRECHECK), Restarted())
    assert s.state.phase == Phase.FAILED and isinstance(s.action, Finish)
    # Setting up: what was done is unknown, so everything is undone.
    s = step(at(Phase.START, destination_made=True, uri="tcp:h:1"), Restarted())
    assert s.action == Rollback(cancel_migration=True, teardown_destination=True)
    # Migrating: keep watching; QEMU carried on without the manager.
    s = step(at(Phase.MONITOR, started=True, destination_made=True), Restarted())
    assert s.action == AwaitProgress(known_status=None)
    # Past the switchover: the step it stood at, again (they are idempotent).
    s = step(at(Phase.STOP_SOURCE, switched_over=True, started=True), Restarted())
    assert isinstance(s.action, ConfirmSource) and s.state.switched_over


def test_shared_nothing_copies_the_disks_before_the_memory() -> None:
    uri = "tcp:198.18.1.12:4444"
    steps, state = [], MigrationState()
    seq: list[Event] = [
        Begin(copy_disks=True),
        Succeeded(),
        Succeeded(uri=uri),
        MirrorProgress(synced=False),
        Failed("one lost answer"),
        MirrorProgress(synced=True),
        Succeeded(),
        Progress(Qs.COMPLETED),
        Succeeded(),
        Succeeded(),
        Succeeded(),
        Succeeded(),
    ]
    for ev in seq:
        s = step(state, ev)
        steps.append(s)
        state = s.state
    assert [type(s.action) for s in steps] == [
        RunPrechecks,
        PrepareDestination,
        MirrorDisks,
        MirrorDisks,
        MirrorDisks,  # a lost poll is asked again
        StartMigration,
        AwaitProgress,
        FinishDestination,
        Announce,
        ConfirmSource,
        UpdateInventory,
        Finish,
    ]
    assert steps[5].action == StartMigration(uri)
    assert state.phase == Phase.DONE


def test_shared_nothing_rollbacks_stop_the_mirror() -> None:
    at_mirror = MigrationState(
        phase=Phase.MIRROR,
        copy_disks=True,
        mirror_started=True,
        destination_made=True,
        uri="tcp:h:1",
    )
    cancelled = step(at_mirror, CancelRequested())
    assert cancelled.action == Rollback(
        cancel_migration=False, teardown_destination=True, stop_mirror=True
    )
    # A copy that fails (or stalls) for good is not asked again.
    failed = step(at_mirror, Failed("the disk copy failed", retryable=False))
    assert isinstance(failed.action, Rollback) and failed.action.stop_mirror
    # A manager restart mid-copy: what the agents did is not known, all is undone.
    resumed = step(at_mirror, Restarted())
    assert resumed.action == Rollback(
        cancel_migration=False, teardown_destination=True, stop_mirror=True
    )
    # During the memory copy a cancel stops QEMU's migration and the mirror.
    monitoring = step(
        MigrationState(
            phase=Phase.MONITOR,
            copy_disks=True,
            mirror_started=True,
            destination_made=True,
            started=True,
        ),
        CancelRequested(),
    )
    assert monitoring.action == Rollback(
        cancel_migration=True, teardown_destination=True, stop_mirror=True
    )
    # QEMU's reason for a cancelled migration (the disks could not end in sync) is kept.
    why = step(
        replace(at_mirror, phase=Phase.MONITOR, started=True),
        Progress(Qs.CANCELLED, "disk copy: disk 0 is not in sync"),
    )
    assert "not in sync" in (why.state.error or "")


TO_SWITCHOVER: list[Event] = [
    Begin(migration_id="0" * 32),
    Succeeded(),
    Succeeded(uri="tcp:h:1"),
    Succeeded(),
    Progress(Qs.COMPLETED),
]


@settings(max_examples=300)
@given(st.booleans(), st.lists(events, max_size=40))
def test_a_destination_seen_running_is_never_undone(ran: bool, seq: list[Event]) -> None:
    """From the switchover (``ran``: the destination was seen running), whatever happens: no
    recovery once it ran, no teardown of it, a recovery only on the destination agent's own
    word, and every end says where the VM is or marks it."""
    state = MigrationState()
    for ev in [*TO_SWITCHOVER, *([Succeeded()] if ran else [])]:
        state = step(state, ev).state
    assert state.destination_running == ran
    for ev in seq:
        before = state
        s = step(state, ev)
        state = s.state
        if before.destination_running:
            assert state.phase not in (Phase.RECOVER, Phase.ROLLBACK), (before, ev)
            assert not isinstance(s.action, Recover | Rollback)
        if isinstance(s.action, Recover) and before.phase != Phase.RECOVER:
            assert isinstance(ev, Failed) and ev.not_running
        if state.terminal and not before.terminal:
            if state.phase == Phase.DONE:
                assert state.destination_running and not state.unconfirmed
            elif state.phase == Phase.CONFIRM_PENDING:
                assert state.destination_running and state.attention
            else:
                recovered = before.phase == Phase.RECOVER and isinstance(ev, Succeeded)
                assert state.phase == Phase.FAILED and (recovered or state.attention)


def test_a_finish_that_cannot_be_confirmed_is_retried_then_fails_with_nothing_undone() -> None:
    """Unreachable, 5xx, a paused destination that does not start: it may run, so nothing is
    removed or resumed; retried with backoff (0.5 s doubling to 30 s), then the VM is marked."""
    steps = run([*TO_SWITCHOVER, *[Failed("host h2: unreachable")] * (FINISH_RETRIES + 1)])
    waits = [s.action.after_s for s in steps[5:-1] if isinstance(s.action, FinishDestination)]
    assert waits[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and len(waits) == FINISH_RETRIES
    last = steps[-1].state
    assert last.phase == Phase.FAILED and "switchover unconfirmed" in (last.attention or "")
    assert not any(isinstance(s.action, Recover | Rollback) for s in steps)


def test_recover_asks_again_and_goes_forward_if_the_destination_runs() -> None:
    at_recover = run([*TO_SWITCHOVER, Failed("crashed", retryable=False, not_running=True)])
    state = at_recover[-1].state
    assert state.phase == Phase.RECOVER
    # Unreachable: asked again with backoff, never resumed on a guess.
    again = step(state, Failed("host h2: unreachable"))
    assert again.action == Recover(after_s=0.5)
    # Asked again, it runs after all (SwitchedOver): forward, the Finish step again.
    forward = step(again.state, Progress(Qs.COMPLETED))
    assert forward.state.phase == Phase.VERIFY and forward.action == FinishDestination()
    # Refused (the source's copy is stale): failed, nothing more undone, the VM marked.
    refused = step(state, Failed("stale_copy", retryable=False))
    assert refused.state.phase == Phase.FAILED and refused.state.attention


def test_agents_contradicting_each_other_end_in_attention_not_a_loop() -> None:
    """Verify hears "not running", Recover hears "completed", again and again: the machine
    stops going round after MAX_REVERSALS and marks the VM, with nothing removed or resumed."""
    state = run([*TO_SWITCHOVER])[-1].state
    seen: list[Step] = []
    for _ in range(50):
        if state.terminal:
            break
        if state.phase == Phase.VERIFY:
            s = step(state, Failed("not running", retryable=False, not_running=True))
        else:
            s = step(state, Progress(Qs.COMPLETED))
        seen.append(s)
        state = s.state
    assert state.phase == Phase.FAILED, [s.note for s in seen]
    assert state.attention and "running and not running" in state.attention
    assert sum(isinstance(s.action, Recover) for s in seen) == MAX_REVERSALS + 1
    # Survives a restart of the manager: the count is persisted.
    assert MigrationState.from_json(state.to_json()).reversals == MAX_REVERSALS


def test_the_id_and_the_new_fields_survive_a_restart() -> None:
    state = run([*TO_SWITCHOVER])[-1].state
    state = replace(state, postcopy_requested=True, attempts=3, unconfirmed=True)
    assert MigrationState.from_json(state.to_json()) == state
    assert state.migration_id == "0" * 32
    # A state persisted before issue 22 reads with the defaults.
    old = {"phase": "monitor", "started": True, "destination_made": True}
    restored = MigrationState.from_json(old)
    assert restored.migration_id is None and not restored.postcopy_requested


def test_postcopy_requested_reaches_the_state_from_the_progress_that_asked() -> None:
    monitoring = run([*TO_SWITCHOVER[:4], Progress(Qs.ACTIVE)])[-1].state
    asked = step(monitoring, Progress(Qs.ACTIVE, postcopy_requested=True))
    assert asked.state.postcopy_requested
    # ... and a later answer without it does not take it back.
    assert step(asked.state, Progress(Qs.ACTIVE)).state.postcopy_requested
