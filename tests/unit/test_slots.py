"""Per-host migration slots with priority: order, limits and cancellation, on a real loop."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.server.tasks.slots import Priority, Slots


def test_a_high_priority_move_starts_before_normal_ones_already_waiting() -> None:
    async def main() -> list[str]:
        slots, order = Slots(1), []
        gate = asyncio.Event()

        async def move(name: str, priority: Priority) -> None:
            async with slots.hold(priority):
                order.append(name)
                await gate.wait()

        first = asyncio.create_task(move("running", "normal"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(move(f"n{i}", "normal")) for i in range(3)]
        await asyncio.sleep(0)
        urgent = asyncio.create_task(move("high", "high"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *waiting, urgent)
        return order

    assert asyncio.run(main()) == ["running", "high", "n0", "n1", "n2"]


def test_a_cancelled_waiter_neither_holds_nor_loses_a_slot() -> None:
    async def main() -> tuple[int, int]:
        slots = Slots(1)
        await slots.acquire()
        gone = asyncio.create_task(slots.acquire("high"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        slots.release()  # the cancelled waiter is skipped: the slot is free again
        await asyncio.wait_for(slots.acquire(), 1)
        return slots.free, slots.waiting

    assert asyncio.run(main()) == (0, 0)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(min_value=1, max_value=3),
    st.lists(st.tuples(st.sampled_from(["high", "normal"]), st.booleans()), max_size=12),
)
def test_never_more_than_the_limit_and_every_survivor_runs(
    limit: int, moves: list[tuple[Priority, bool]]
) -> None:
    async def main() -> None:
        slots, inside, most, done = Slots(limit), [0], [0], []

        async def move(i: int, priority: Priority) -> None:
            async with slots.hold(priority):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                try:
                    await asyncio.sleep(0)  # a cancel may land here, holding the slot
                finally:
                    inside[0] -= 1
                done.append(i)

        tasks = [asyncio.create_task(move(i, p)) for i, (p, _) in enumerate(moves)]
        await asyncio.sleep(0)
        for t, (_, cancel) in zip(tasks, moves, strict=True):
            if cancel:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert most[0] <= limit
        survivors = {i for i, t in enumerate(tasks) if not t.cancelled()}
        assert set(done) == survivors
        assert slots.free == limit and slots.waiting == 0

    asyncio.run(main())


def test_a_waiter_cancelled_just_after_it_was_handed_the_slot_passes_it_on() -> None:
    async def main() -> tuple[int, int]:
        slots = Slots(1)
        await slots.acquire()
        handed = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # the slot goes to the waiter...
        handed.cancel()  # ...which is cancelled before it runs again
        await asyncio.gather(handed, return_exceptions=True)
        return slots.free, slots.waiting

    assert asyncio.run(main()) == (1, 0)


def test_a_stop_while_waiting_gives_up_holding_nothing() -> None:
    async def main() -> tuple[bool, bool, int, int]:
        slots, stop = Slots(1), asyncio.Event()
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire_unless("high", stop))
        await asyncio.sleep(0)
        stop.set()
        gave_up = not await waiter
        slots.release()
        # Stopped already, a free slot is still taken: the caller sees the stop itself.
        took = await slots.acquire_unless("normal", stop)
        slots.release()
        return gave_up, took, slots.free, slots.waiting

    assert asyncio.run(main()) == (True, True, 1, 0)


@pytest.mark.parametrize("release_first", [True, False])
def test_a_caller_cancelled_around_the_hand_over_neither_holds_nor_loses_it(
    release_first: bool,
) -> None:
    async def main() -> tuple[int, int]:
        slots, stop = Slots(1), asyncio.Event()
        await slots.acquire()
        caller = asyncio.create_task(slots.acquire_unless("normal", stop))
        for _ in range(3):  # the caller waits for the slot
            await asyncio.sleep(0)
        if release_first:
            slots.release()  # handed to the caller's waiter...
            caller.cancel()  # ...and the caller cancelled before either runs again
        else:
            caller.cancel()  # cancelled while waiting...
            await asyncio.sleep(0)
            slots.release()  # ...so the slot must not go to its abandoned waiter
        await asyncio.gather(caller, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
        return slots.free, slots.waiting

    assert asyncio.run(main()) == (1, 0)


def test_a_free_slot_is_taken_without_yielding_to_the_loop() -> None:
    async def main() -> tuple[bool, int]:
        slots, stop, others_ran = Slots(1), asyncio.Event(), []

        async def other() -> None:
            others_ran.append(True)

        pending = asyncio.create_task(other())
        took = await slots.acquire_unless("normal", stop)
        before = len(others_ran)  # nothing else ran: the move starts in the same step
        await pending
        return took and before == 0, slots.free

    assert asyncio.run(main()) == (True, 0)
