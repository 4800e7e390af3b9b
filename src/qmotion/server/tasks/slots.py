"""A host's migration slots: at most N moves at once, the waiting ones served by priority.

vMotion lets an operator mark a move high priority; here that means it starts before every
normal move still waiting for the same host's slots (never before one holding a slot already,
running or waiting for its other host's). Within a priority, the first to wait is served
first. Normal moves can starve behind a stream of high ones: by design, as a priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from typing import Literal

Priority = Literal["high", "normal"]
RANK: dict[str, int] = {"high": 0, "normal": 1}


class Slots:
    """``limit`` holders at a time; a freed slot goes to the best waiter directly, so a new
    arrival never overtakes one that waits."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiting if not f.done())

    async def acquire(self, priority: Priority = "normal") -> None:
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (RANK[priority], next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            # Handed the slot just as it was cancelled: pass it on, or it is lost.
            if granted.done() and not granted.cancelled():
                self.release()
            raise

    async def acquire_unless(self, priority: Priority, stop: asyncio.Event | None) -> bool:
        """The slot; or False, holding nothing, as soon as ``stop`` is set while waiting (a
        move cancelled while queued ends at once, not when a slot frees up)."""
        if stop is None:
            await self.acquire(priority)
            return True
        if self.free > 0 and not self.waiting:
            # Free: taken without yielding to the loop, as ``acquire`` does, so a move whose
            # slots are free starts in the same step it was let through.
            self.free -= 1
            return True
        taking = asyncio.ensure_future(self.acquire(priority))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # This task itself was cancelled: whatever ``taking`` got is given back.
            stopping.cancel()
            if not taking.done():
                taking.cancel()  # a slot handed to it meanwhile is passed on (acquire)
            elif not taking.cancelled() and taking.exception() is None:
                self.release()
            raise
        stopping.cancel()
        if not taking.done():
            taking.cancel()  # a slot handed to it meanwhile is passed on (acquire)
            return False
        taking.result()  # an error of acquire's is the caller's, not a quiet "stopped"
        return True

    def release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():  # a cancelled waiter's entry is skipped here
                granted.set_result(None)
                return
        self.free += 1

    @contextlib.asynccontextmanager
    async def hold(self, priority: Priority = "normal") -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
