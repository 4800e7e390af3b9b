"""A deterministic event loop for the campaign: one thread, simulated time, inline threads.

The manager's real code runs unchanged on it, and the same schedule gives the same run:

- ``asyncio.to_thread`` (the manager's database and agent calls) runs inline, in the loop's
  thread, on the spot: no worker threads, so no scheduling that differs from run to run;
- the loop's clock is the world's simulated clock (``SimClock``): when nothing is ready, the
  loop jumps it to the next timer instead of sleeping, so 30 s backoffs and 15 s refresh
  rounds cost no wall time, and the manager's timeouts happen in the same order every run.

A coroutine that waits for something that never comes (no timer, nothing ready) is a stall:
the loop raises ``Stalled`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
MAX_JUMP_S = 3600.0  # one idle wait never moves the clock further than this
STALL_WAIT_S = 5.0  # real seconds


class Stalled(RuntimeError):
    """Nothing is ready and no timer is set: the awaited event can never come."""


class InlineExecutor(ThreadPoolExecutor):
    """Runs each submitted call at once, in the caller's thread (a ThreadPoolExecutor only
    because asyncio accepts no other as its default; it never starts a thread)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the awaiting coroutine receives it, as from a thread
            future.set_exception(exc)
        return future


class _SimSelector(selectors.DefaultSelector):
    """Polls without blocking; an idle wait moves the simulated clock instead."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            # Only a real thread can still wake the loop (asyncio's own executor shutdown):
            # given a moment of real time, then it is a stall.
            ready = super().select(STALL_WAIT_S)
            if not ready:
                raise Stalled("nothing is ready and no timer is set")
            return ready
        self._advance(min(timeout, MAX_JUMP_S))
        return []


class SimLoop(asyncio.SelectorEventLoop):
    """``now`` reads the simulated clock, ``advance`` moves it (the world's time)."""

    def __init__(self, now: Callable[[], float], advance: Callable[[float], None]) -> None:
        super().__init__(selector=_SimSelector(advance))
        self._now = now
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        return self._now()


def run(
    main: Coroutine[Any, Any, T], now: Callable[[], float], advance: Callable[[float], None]
) -> T:
    """Run ``main`` to its end on a fresh SimLoop."""
    with asyncio.Runner(loop_factory=lambda: SimLoop(now, advance)) as runner:
        return runner.run(main)
