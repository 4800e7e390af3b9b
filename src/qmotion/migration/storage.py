"""Storage vMotion as a pure state machine, and the loop that runs it against a port.

``step(state, event, now)`` returns the next state and the one action to take; it does no I/O.
The rules, in order of what matters:

- before the pivot, any failure or a cancel rolls back: jobs cancelled, new files removed,
  the VM keeps running on its old disks (the agent's ``abort``, retried; if it never answers
  the task fails naming the files that may be left);
- the pivot switches all disks or none (the agent's guarantee); when its answer is lost, the
  agent's status decides: switched -> go on, not switched -> roll back, unknown -> ask again,
  and after ``MAX_PIVOT_CHECKS`` the task fails with nothing removed (both copies kept);
- the old files are removed only after the pivot; if that fails the move still succeeded
  and the files are named as leftovers (so are the new ones a rollback could not remove);
- a call that failed is tried again after a wait that doubles each time (from twice the
  poll interval, at most ``RETRY_MAX_S``): an agent that restarts or drops off the network
  for a while is waited for, not given up on within a second;
- copy mode: ``write-blocking`` once every disk is in sync, or as soon as the copy stops
  gaining on the guest's writes for ``STALL_S`` (a guest writing faster than the copy would
  otherwise never let it converge).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from qmotion.api.storage import MirrorStatus
from qmotion.api.vm import Disk

STALL_S = 10.0  # no progress on "remaining" for this long -> write-blocking from now on
MAX_ROLLBACK_TRIES = 8  # with the doubling wait: about 50 s
MAX_PIVOT_CHECKS = 30
MAX_POLL_FAILURES = 15  # consecutive status calls that failed before rolling back
POLL_S = 0.2  # a status call is two QMP queries: cheap; a copy may take only seconds
# Near the copy's end (or in sync, its switch awaited): polled this often, so a 1 s copy is
# not reported up to two whole polls late. Not less: each poll is an agent call and a
# commit, and a guest may hold the remaining bytes near zero for seconds.
MIN_POLL_S = 0.05
RETRY_MAX_S = 30.0
# Starts the attention mark of a move that ended unsettled on its agent: reconcile does not
# clear it (the VM runs fine; the agent's record, not the census, is what is unsettled).
UNSETTLED = "storage move unsettled: "


class SPhase(StrEnum):
    START = "start_mirror"
    MIRROR = "mirror"
    PIVOT = "pivot"
    PIVOT_CHECK = "pivot_check"
    RELEASE = "release_old_disks"
    ROLLBACK = "rollback"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (SPhase.DONE, SPhase.FAILED, SPhase.CANCELLED)


@dataclass(frozen=True)
class StorageState:
    phase: SPhase = SPhase.START
    active: bool = False  # write-blocking asked for
    cancel: bool = False
    error: str | None = None
    best_remaining: int | None = None
    gaining_at: float | None = None  # when "remaining" last reached a new low
    failures: int = 0  # consecutive failed calls in this phase
    warnings: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    # The files as the agent last named them (``DATASTORE:PATH``), persisted: a manager
    # restarted before the agent answered again can still name what it leaves behind.
    old_files: tuple[str, ...] = ()
    new_files: tuple[str, ...] = ()
    # Set when the move ends unsettled on the agent (its record still pivoted or mirroring,
    # so the agent refuses to migrate the VM): the VM is marked for an operator.
    attention: str | None = None


# ------------------------------------------------------------------ events (what happened)


@dataclass(frozen=True)
class Started:
    status: MirrorStatus


@dataclass(frozen=True)
class Polled:
    status: MirrorStatus


@dataclass(frozen=True)
class Activated:
    status: MirrorStatus


@dataclass(frozen=True)
class Pivoted:
    status: MirrorStatus


@dataclass(frozen=True)
class Released:
    status: MirrorStatus


@dataclass(frozen=True)
class Aborted:
    status: MirrorStatus


@dataclass(frozen=True)
class CallFailed:
    """The action's call failed. ``refused``: the agent answered that nothing changed;
    ``switched``: it refused because the disks had already switched."""

    error: str
    refused: bool = False
    switched: bool = False


@dataclass(frozen=True)
class CancelAsked:
    pass


@dataclass(frozen=True)
class Restarted:
    """The manager restarted: pick up from the persisted state."""


Event = (
    Started
    | Polled
    | Activated
    | Pivoted
    | Released
    | Aborted
    | CallFailed
    | CancelAsked
    | Restarted
)


class Action(StrEnum):
    START = "start"
    POLL = "poll"
    ACTIVATE = "activate"
    PIVOT = "pivot"
    RELEASE = "release"
    ABORT = "abort"
    NONE = "none"  # final


@dataclass(frozen=True)
class Step:
    state: StorageState
    action: Action
    note: str | None = None


def _rollback(s: StorageState, error: str | None, note: str) -> Step:
    return Step(replace(s, phase=SPhase.ROLLBACK, error=error, failures=0), Action.ABORT, note)


def _forward(s: StorageState, why: str) -> Step:
    """The disks switched (whatever was asked): only the old files' removal is left."""
    return Step(
        replace(s, phase=SPhase.RELEASE, failures=0, warnings=(*s.warnings, why)),
        Action.RELEASE,
        why,
    )


def _mirror_step(s: StorageState, st: MirrorStatus, now: float) -> Step:
    if st.phase == "failed":
        return _rollback(s, st.error or "a mirror job failed", f"mirror failed: {st.error}")
    if st.phase in ("pivoted", "released"):  # a lost pivot answer seen late
        return Step(replace(s, phase=SPhase.RELEASE, failures=0), Action.RELEASE, "switched")
    if st.phase == "switching":
        return Step(replace(s, phase=SPhase.PIVOT_CHECK, failures=0), Action.POLL, "switching")
    if st.copy_mode == "write-blocking":
        s = replace(s, active=True)  # the agent's word, not what was asked
    if s.cancel:
        return _rollback(s, None, "cancel: stopping the mirror")
    if s.best_remaining is None or st.remaining_bytes < s.best_remaining:
        s = replace(s, best_remaining=st.remaining_bytes, gaining_at=now)
    if not s.active:
        all_ready = bool(st.disks) and all(d.ready for d in st.disks)
        stalled = s.gaining_at is not None and now - s.gaining_at >= STALL_S
        if all_ready or stalled:
            why = "in sync" if all_ready else f"no progress for {STALL_S:.0f} s"
            return Step(s, Action.ACTIVATE, f"{why}: guest writes now go to both copies")
        return Step(s, Action.POLL)
    if st.synced:
        return Step(replace(s, phase=SPhase.PIVOT, failures=0), Action.PIVOT, "pivot")
    return Step(s, Action.POLL)


def step(s: StorageState, event: Event, now: float) -> Step:
    """The next state and action; pure."""
    if s.phase.final:
        return Step(s, Action.NONE)
    if isinstance(event, CancelAsked):
        s = replace(s, cancel=True)
        if s.phase in (SPhase.START, SPhase.MIRROR):
            return _rollback(s, None, "cancel: stopping the mirror")
        return Step(s, _resume_action(s), "cancel asked: too late, the disks are switching")
    if isinstance(event, Restarted):
        if s.phase == SPhase.PIVOT:  # the pivot may or may not have been sent: ask first
            s = replace(s, phase=SPhase.PIVOT_CHECK)
        if s.phase == SPhase.START:  # whatever the start created goes
            s = replace(s, phase=SPhase.ROLLBACK, error="the manager restarted while starting")
        return Step(replace(s, failures=0), _resume_action(s), "manager restarted: resuming")
    if isinstance(event, CallFailed) and event.switched and s.phase != SPhase.RELEASE:
        return _forward(s, f"the disks had already switched: going forward ({event.error})")
    match s.phase:
        case SPhase.START:
            if isinstance(event, Started):
                s = replace(s, phase=SPhase.MIRROR, gaining_at=now, failures=0)
                return _mirror_step(s, event.status, now)
            if isinstance(event, CallFailed):
                if event.refused:  # nothing was created
                    return Step(replace(s, phase=SPhase.FAILED, error=event.error), Action.NONE)
                return _rollback(s, event.error, f"start failed: {event.error}")
        case SPhase.MIRROR:
            if isinstance(event, Polled | Activated):
                if isinstance(event, Activated):
                    s = replace(s, active=True)
                return _mirror_step(replace(s, failures=0), event.status, now)
            if isinstance(event, CallFailed):
                failures = s.failures + 1
                if failures >= MAX_POLL_FAILURES:
                    return _rollback(s, event.error, f"agent unreachable: {event.error}")
                return Step(replace(s, failures=failures), Action.POLL, event.error)
        case SPhase.PIVOT | SPhase.PIVOT_CHECK:
            if isinstance(event, Pivoted):
                return Step(replace(s, phase=SPhase.RELEASE, failures=0), Action.RELEASE)
            if isinstance(event, Polled):
                st = event.status
                if st.phase in ("pivoted", "released"):
                    return Step(replace(s, phase=SPhase.RELEASE, failures=0), Action.RELEASE)
                if st.phase in ("failed", "aborted"):
                    return _rollback(s, st.error or "the pivot did not happen", "not switched")
                failures = s.failures + 1
                if failures > MAX_PIVOT_CHECKS:
                    if st.phase == "switching":
                        return _pivot_unknown(s, st.error or "pivot unknown")
                    return _rollback(s, "the pivot did not happen", "not switched")
                if st.phase == "switching":  # the agent settles it once QEMU answers
                    return Step(
                        replace(s, phase=SPhase.PIVOT_CHECK, failures=failures), Action.POLL
                    )
                # Not switched and still mirroring: the pivot is asked (again); the agent
                # refuses it unless every disk is in sync.
                if st.synced:
                    return Step(replace(s, phase=SPhase.PIVOT, failures=failures), Action.PIVOT)
                return _mirror_step(replace(s, phase=SPhase.MIRROR, failures=0), st, now)
            if isinstance(event, CallFailed):
                if event.refused:  # the agent said nothing was switched
                    return _rollback(s, event.error, f"pivot refused: {event.error}")
                failures = s.failures + 1
                if failures > MAX_PIVOT_CHECKS:
                    return _pivot_unknown(s, f"pivot unknown: {event.error}")
                return Step(
                    replace(s, phase=SPhase.PIVOT_CHECK, failures=failures),
                    Action.POLL,
                    f"pivot answer lost ({event.error}): asking the agent",
                )
        case SPhase.RELEASE:
            if isinstance(event, Released):
                st = event.status
                warnings = (*s.warnings, *([st.error] if st.error else []))
                warnings += tuple(f"left behind: {f}" for f in st.leftovers)
                return Step(
                    replace(s, phase=SPhase.DONE, leftovers=tuple(st.leftovers), warnings=warnings),
                    Action.NONE,
                    "old files removed",
                )
            if isinstance(event, CallFailed):
                failures = s.failures + 1
                if failures >= MAX_ROLLBACK_TRIES:
                    warning = f"old disk files not removed: {event.error}"
                    return Step(
                        replace(s, phase=SPhase.DONE, warnings=(*s.warnings, warning)),
                        Action.NONE,
                        warning,
                    )
                return Step(replace(s, failures=failures), Action.RELEASE, event.error)
        case SPhase.ROLLBACK:
            if isinstance(event, Aborted):
                final = SPhase.CANCELLED if s.cancel and s.error is None else SPhase.FAILED
                return Step(
                    replace(s, phase=final, leftovers=tuple(event.status.leftovers)),
                    Action.NONE,
                    "rolled back: the VM runs on its old disks",
                )
            if isinstance(event, CallFailed):
                failures = s.failures + 1
                if failures >= MAX_ROLLBACK_TRIES:
                    return Step(
                        replace(
                            s,
                            phase=SPhase.FAILED,
                            error=s.error or event.error,
                            warnings=(*s.warnings, f"rollback incomplete: {event.error}"),
                        ),
                        Action.NONE,
                        "rollback incomplete: new files may be left on the target datastore",
                    )
                return Step(replace(s, failures=failures), Action.ABORT, event.error)
        case _:
            pass
    return Step(s, _resume_action(s))  # an event that does not apply here: keep going


def _pivot_unknown(s: StorageState, error: str) -> Step:
    """Given up asking whether the disks switched: both copies are kept (nothing may be
    removed on a guess), the agent's record stays open, so the VM is marked."""
    attention = (
        f"{UNSETTLED}whether the disks switched is unknown (both copies kept); the agent "
        "refuses to move the VM until that is settled"
    )
    return Step(
        replace(s, phase=SPhase.FAILED, error=error, attention=attention),
        Action.NONE,
        "whether the disks switched is unknown: both copies kept",
    )


def _resume_action(s: StorageState) -> Action:
    return {
        SPhase.START: Action.ABORT,
        SPhase.MIRROR: Action.POLL,
        SPhase.PIVOT: Action.POLL,
        SPhase.PIVOT_CHECK: Action.POLL,
        SPhase.RELEASE: Action.RELEASE,
        SPhase.ROLLBACK: Action.ABORT,
    }.get(s.phase, Action.NONE)


# ------------------------------------------------------------------ the loop (I/O at the port)


class StoragePortError(Exception):
    """A port call failed; ``refused``: the agent answered that nothing changed;
    ``switched``: it refused because the disks already switched (go forward)."""

    def __init__(self, message: str, *, refused: bool = False, switched: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.switched = switched


class StoragePort(Protocol):
    async def start(self) -> MirrorStatus: ...
    async def status(self) -> MirrorStatus: ...
    async def activate(self) -> MirrorStatus: ...
    async def pivot(self) -> MirrorStatus: ...
    async def release(self) -> MirrorStatus: ...
    async def abort(self) -> MirrorStatus: ...


Persist = Callable[[Step, MirrorStatus | None], Awaitable[None]]

_CALLS: dict[Action, tuple[str, type[Started | Polled | Activated | Pivoted | Released | Aborted]]]
_CALLS = {
    Action.START: ("start", Started),
    Action.POLL: ("status", Polled),
    Action.ACTIVATE: ("activate", Activated),
    Action.PIVOT: ("pivot", Pivoted),
    Action.RELEASE: ("release", Released),
    Action.ABORT: ("abort", Aborted),
}


async def run(
    port: StoragePort,
    persist: Persist,
    cancel: asyncio.Event,
    resume: StorageState | None = None,
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = POLL_S,
    guard: Callable[[], Awaitable[None]] | None = None,
) -> StorageState:
    """Drive the machine until it ends; every step is persisted before its action runs."""
    if resume is None:
        st = Step(StorageState(), Action.START, "mirroring the disks")
    else:
        st = step(resume, Restarted(), clock())
    status: MirrorStatus | None = None
    cancel_seen = False
    while True:
        await persist(st, status)
        if st.action == Action.NONE:
            return st.state
        if cancel.is_set() and not cancel_seen:
            cancel_seen = True
            st = step(st.state, CancelAsked(), clock())
            continue
        if st.action == Action.POLL or st.state.failures:
            wait = (
                _retry_wait(poll_s, st.state.failures)
                if st.state.failures
                else poll_wait(poll_s, status)
            )
            await _sleep_or_cancel(cancel if not cancel_seen else None, wait)
            if cancel.is_set() and not cancel_seen:
                continue
        method, event_type = _CALLS[st.action]
        if guard is not None:
            await guard()  # may the caller still act? (it stops the run here if not)
        try:
            status = await getattr(port, method)()
        except StoragePortError as exc:
            failed = CallFailed(str(exc), refused=exc.refused, switched=exc.switched)
            before = st.state.phase
            st = step(st.state, failed, clock())
            if st.action == Action.NONE and before in (SPhase.RELEASE, SPhase.ROLLBACK):
                st = _gave_up(st, before)
            continue
        assert status is not None
        st = step(_with_files(st.state, status), event_type(status), clock())


def _with_files(s: StorageState, status: MirrorStatus) -> StorageState:
    if not status.disks:
        return s
    old = tuple(_file(m.source) for m in status.disks)
    new = tuple(_file(m.target) for m in status.disks)
    return replace(s, old_files=old, new_files=new)


def _file(d: Disk) -> str:
    return f"{d.datastore}:{d.path}"


def poll_wait(poll_s: float, status: MirrorStatus | None) -> float:
    """Up to ``poll_s``; sooner when the copy should end before then (what remains at the
    last rate), or nothing remains (in sync: the switch is awaited)."""
    if status is None:
        return poll_s
    if status.remaining_bytes <= 0:
        return MIN_POLL_S
    if status.rate_bps > 0:
        return max(MIN_POLL_S, min(poll_s, status.remaining_bytes / status.rate_bps))
    return poll_s


def _retry_wait(poll_s: float, failures: int) -> float:
    return float(min(2.0 * poll_s * 2.0 ** (failures - 1), RETRY_MAX_S))


def _gave_up(st: Step, gave_up: SPhase) -> Step:
    """The agent never answered the removal: the files it was to remove stay, named (the
    old ones after a release, the new ones after a rollback, as far as any answer named
    them), and the VM is marked: the agent's record of the move stays unsettled, and it
    refuses to migrate the VM until an operator settles it (``qmotion vm resolve``)."""
    s = st.state
    files = s.old_files if gave_up == SPhase.RELEASE else s.new_files
    warnings = (*s.warnings, *(f"left behind: {f}" for f in files))
    what = "releasing the old disk files" if gave_up == SPhase.RELEASE else "the rollback"
    to = s.new_files[0].split(":", 1)[0] if s.new_files else "another datastore"
    attention = (
        f"{UNSETTLED}to {to}: the agent did not confirm {what}; it refuses to move the VM "
        "until that is settled"
    )
    state = replace(s, leftovers=(*s.leftovers, *files), warnings=warnings, attention=attention)
    return replace(st, state=state)


async def _sleep_or_cancel(cancel: asyncio.Event | None, seconds: float) -> None:
    if cancel is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cancel.wait(), seconds)


def state_to_json(s: StorageState) -> dict[str, object]:
    return {
        "kind": "storage",
        "phase": s.phase.value,
        "active": s.active,
        "cancel": s.cancel,
        "error": s.error,
        "warnings": list(s.warnings),
        "leftovers": list(s.leftovers),
        "old_files": list(s.old_files),
        "new_files": list(s.new_files),
        "attention": s.attention,
    }


def state_from_json(d: dict[str, object]) -> StorageState:
    return StorageState(
        phase=SPhase(str(d["phase"])),
        active=bool(d.get("active")),
        cancel=bool(d.get("cancel")),
        error=str(d["error"]) if d.get("error") else None,
        warnings=tuple(str(w) for w in d.get("warnings") or ()),  # type: ignore[attr-defined]
        leftovers=tuple(str(w) for w in d.get("leftovers") or ()),  # type: ignore[attr-defined]
        old_files=tuple(str(f) for f in d.get("old_files") or ()),  # type: ignore[attr-defined]
        new_files=tuple(str(f) for f in d.get("new_files") or ()),  # type: ignore[attr-defined]
        attention=str(d["attention"]) if d.get("attention") else None,
    )
