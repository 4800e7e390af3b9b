"""The port's stall timers alone: each answer and the time it was read, no agents, no clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qmotion.api.migration import MigrationStats
from qmotion.api.migration import QemuMigrationStatus as Qs
from qmotion.server.tasks.watchdog import (
    DEVICE_STUCK_S,
    POSTCOPY_RECOVER_S,
    POSTCOPY_STALL_S,
    PRE_SWITCHOVER_STUCK_S,
    STALL_TIMEOUT_S,
    Watchdog,
)

T0 = 1000.0


def _stats(status: Qs, transferred: int = 0) -> MigrationStats:
    return MigrationStats(status=status, transferred=transferred)


def test_a_stream_that_moves_nothing_is_abandoned_after_the_stall_timeout() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.ACTIVE, 100), T0) is None
    assert dog.observe(_stats(Qs.ACTIVE, 100), T0 + STALL_TIMEOUT_S) is None  # not yet past
    why = dog.observe(_stats(Qs.ACTIVE, 100), T0 + STALL_TIMEOUT_S + 0.1)
    assert why == f"no data moved for {STALL_TIMEOUT_S:.0f} s"


def test_a_stream_stuck_in_setup_counts_from_its_creation() -> None:
    """A TLS handshake that never completes moves nothing from the start: the timer runs
    from when the watchdog was made, not from the first answer."""
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.SETUP, -1), T0 + 10) is None
    assert dog.observe(_stats(Qs.SETUP, -1), T0 + STALL_TIMEOUT_S + 1) is not None


def test_moving_bytes_or_a_status_that_does_not_move_restarts_the_timer() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.ACTIVE, 1), T0 + 20) is None
    assert dog.observe(_stats(Qs.ACTIVE, 2), T0 + 45) is None  # moved: fresh timer at 45
    assert dog.observe(_stats(Qs.ACTIVE, 2), T0 + 70) is None
    # The switchover itself moves no RAM bytes and is not a stall.
    assert dog.observe(_stats(Qs.DEVICE, 2), T0 + 80) is None
    assert dog.observe(_stats(Qs.ACTIVE, 2), T0 + 80 + STALL_TIMEOUT_S) is None
    assert dog.observe(_stats(Qs.ACTIVE, 2), T0 + 80 + STALL_TIMEOUT_S + 1) is not None


def test_a_stalled_postcopy_stream_is_reported_once_per_stall() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), T0) is None
    at = T0 + POSTCOPY_STALL_S + 0.5
    why = dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), at)
    assert why == f"the postcopy stream moved nothing for {POSTCOPY_STALL_S:.0f} s"
    # The recovery it asks for gets its own time: the next answer is no second stall.
    assert dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), at + 1) is None
    assert dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), at + POSTCOPY_STALL_S + 1) is not None


def test_a_reconnected_postcopy_stream_gets_a_fresh_start() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), T0) is None
    dog.recovered(T0 + POSTCOPY_STALL_S)
    assert dog.observe(_stats(Qs.POSTCOPY_ACTIVE, 5), T0 + POSTCOPY_STALL_S + 1) is None


def test_a_reconnection_that_does_not_complete_is_ended_and_tried_again() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.POSTCOPY_RECOVER_SETUP), T0) is None
    assert dog.observe(_stats(Qs.POSTCOPY_RECOVER), T0 + POSTCOPY_RECOVER_S) is None
    why = dog.observe(_stats(Qs.POSTCOPY_RECOVER), T0 + POSTCOPY_RECOVER_S + 1)
    assert why is not None and f"after {POSTCOPY_RECOVER_S:.0f} s" in why
    # The next attempt is timed from its own start.
    assert dog.observe(_stats(Qs.POSTCOPY_RECOVER), T0 + POSTCOPY_RECOVER_S + 2) is None


def test_a_source_held_at_pre_switchover_is_abandoned() -> None:
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.PRE_SWITCHOVER, 9), T0) is None
    assert dog.observe(_stats(Qs.PRE_SWITCHOVER, 9), T0 + PRE_SWITCHOVER_STUCK_S) is None
    why = dog.observe(_stats(Qs.PRE_SWITCHOVER, 9), T0 + PRE_SWITCHOVER_STUCK_S + 1)
    assert why is not None and "pre-switchover" in why
    # Leaving it resets the timer.
    assert dog.observe(_stats(Qs.DEVICE, 9), T0 + 40) is None
    assert dog.observe(_stats(Qs.PRE_SWITCHOVER, 9), T0 + 41) is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from([Qs.SETUP, Qs.ACTIVE, Qs.POSTCOPY_ACTIVE]),
            st.floats(min_value=0.0, max_value=4.9),
        ),
        max_size=60,
    )
)
def test_a_stream_that_keeps_moving_is_never_abandoned(
    answers: list[tuple[Qs, float]],
) -> None:
    """Bytes moving at every answer, answers less than the shortest stall apart."""
    dog = Watchdog(progress_at=T0)
    now = T0
    for i, (status, gap) in enumerate(answers):
        now += gap
        assert dog.observe(_stats(status, i), now) is None


def test_a_device_state_that_does_not_go_through_is_reported_after_its_limit() -> None:
    """Issue 22: the guest is paused while QEMU sends the device state; a link that dies then
    would hold it paused until TCP gives up. Moving to ``device`` is no stall (no RAM moves
    there), but staying in it past DEVICE_STUCK_S is."""
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.ACTIVE, 100), T0) is None
    assert dog.observe(_stats(Qs.DEVICE, 100), T0 + 1) is None
    assert dog.observe(_stats(Qs.DEVICE, 100), T0 + 1 + DEVICE_STUCK_S) is None  # not yet past
    why = dog.observe(_stats(Qs.DEVICE, 100), T0 + 1.1 + DEVICE_STUCK_S)
    assert why == f"the device state has not gone through for {DEVICE_STUCK_S:.0f} s"
    assert dog.stuck_in == Qs.DEVICE  # the rollback cancels it without waiting for the end
    # A device state that ends (completed, or back to active after a failed switchover) and
    # a later one: each gets its own timer.
    fresh = Watchdog(progress_at=T0)
    assert fresh.observe(_stats(Qs.DEVICE, 1), T0) is None
    assert fresh.observe(_stats(Qs.ACTIVE, 2), T0 + 5) is None
    assert fresh.observe(_stats(Qs.DEVICE, 2), T0 + 6) is None
    assert fresh.observe(_stats(Qs.DEVICE, 2), T0 + 6 + DEVICE_STUCK_S) is None
    assert fresh.stuck_in is None


def test_a_migration_the_source_does_not_know_by_its_id_is_a_stall() -> None:
    """Asked by the id, a source with no such migration answers ``none``: after migrate was
    issued that moves nothing, and is abandoned like a stream that does not move."""
    dog = Watchdog(progress_at=T0)
    assert dog.observe(_stats(Qs.NONE, 0), T0 + 1) is None
    assert dog.observe(_stats(Qs.NONE, 0), T0 + STALL_TIMEOUT_S + 2) is not None
