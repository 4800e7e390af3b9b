"""Per-step timings of a migration's start, so the slow step shows in every report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from qmotion.api.migration import StepTime


class Stopwatch:
    """Times named steps from an origin on ``clock`` (monotonic seconds). A step that
    raises is recorded too: where a start failed is as useful as where it was slow."""

    def __init__(self, origin: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.origin = clock() if origin is None else origin
        self.steps: list[StepTime] = []

    @contextmanager
    def step(self, name: str, timed: bool = True) -> Iterator[None]:
        """``timed`` False: the work is done but is no step of its own (it is trivial)."""
        began = self.clock()
        try:
            yield
        finally:
            if timed:
                self.add(name, began, self.clock())

    def add(self, name: str, began: float, ended: float) -> None:
        """A step timed elsewhere (``began``/``ended`` on the same clock)."""
        self.steps.append(
            StepTime(
                step=name,
                start_ms=round((began - self.origin) * 1000, 1),
                ms=round((ended - began) * 1000, 1),
            )
        )

    def nest(self, prefix: str, began: float, inner: list[StepTime], ended: float) -> None:
        """An agent's own steps, timed on its clock from the start of its call, placed under
        the call that ran from ``began`` to ``ended`` (its answer arrived). The two clocks
        share no origin: the steps are placed as late as the call allows, the answer's way
        back counted as before them, so no step reads as earlier than it was."""
        offset = (late_origin(began, ended, inner) - self.origin) * 1000
        for s in inner:
            self.steps.append(
                StepTime(
                    step=f"{prefix}: {s.step}", start_ms=round(offset + s.start_ms, 1), ms=s.ms
                )
            )


def late_origin(began: float, ended: float, inner: list[StepTime]) -> float:
    """Where an agent's call's own clock starts on the caller's: its last step ends when the
    answer arrived (never before the call began)."""
    span = max((s.start_ms + s.ms for s in inner), default=0.0) / 1000
    return max(began, ended - span)


def ended_at(began: float, ended: float, inner: list[StepTime], step: str) -> float | None:
    """When the agent's ``step`` ended, on the caller's clock (placed as ``nest`` does)."""
    mark = next((s for s in inner if s.step == step), None)
    if mark is None:
        return None
    return min(ended, late_origin(began, ended, inner) + (mark.start_ms + mark.ms) / 1000)


def summary(steps: list[StepTime], total_ms: float) -> str:
    """One line for a task event: the total, then the manager's steps, slowest first."""
    own = sorted((s for s in steps if ": " not in s.step), key=lambda s: -s.ms)
    parts = ", ".join(f"{s.step} {s.ms:.0f}" for s in own)
    return f"stream started {total_ms:.0f} ms after the request was accepted ({parts}; ms)"


def slowest(steps: list[StepTime]) -> str | None:
    """The manager's slowest step before the stream started, and the agents' slowest."""
    own = [s for s in steps if ": " not in s.step]
    agents = [s for s in steps if ": " in s.step]
    if not own:
        return None
    worst = max(own, key=lambda s: s.ms)
    out = f"{worst.step} {worst.ms:.0f}"
    if agents:
        inner = max(agents, key=lambda s: s.ms)
        out += f"; agents' slowest: {inner.step} {inner.ms:.0f}"
    return out
