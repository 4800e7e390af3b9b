"""Cold migration of a stopped VM as a pure state machine, and the loop that runs it.

Steps: the source exports the VM's disks (read-only NBD), the destination copies each one to
its datastore and verifies the copy against the export, then the destination defines the VM
(and the inventory moves it), then the source forgets the VM and removes the old files. When
every datastore of the VM is reachable from the destination and no datastore is asked for,
nothing is copied: only the definition moves.

Rules (``step`` is pure):
- before the destination defines the VM, any failure or a cancel rolls back: exports ended,
  copies removed, the VM stays defined (and startable) on its source only;
- the definition on the destination is idempotent (same UUID): an answer lost is asked again;
  once it is there the move goes forward, a cancel is answered "too late";
- the old files and the old definition go last; if that fails the move still succeeded and
  what is left is named.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from qmotion.api.vm import Disk

MAX_TRIES = 15  # spaced by the loop's retry interval: an agent restart is waited out


class CPhase(StrEnum):
    EXPORT = "export_disks"
    COPY = "copy_disks"
    DEFINE = "define_destination"
    CLEANUP = "remove_source"
    ROLLBACK = "rollback"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (CPhase.DONE, CPhase.FAILED, CPhase.CANCELLED)


class CAction(StrEnum):
    EXPORT = "export"
    COPY = "copy"
    DEFINE = "define"
    CLEANUP = "cleanup"
    ABORT = "abort"
    NONE = "none"


@dataclass(frozen=True)
class ColdState:
    phase: CPhase
    copying: bool  # disks are copied (else only the definition moves)
    disks: tuple[Disk, ...] = ()  # the copies, once made
    cancel: bool = False
    error: str | None = None
    failures: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Succeeded:
    disks: tuple[Disk, ...] = ()  # what COPY made
    leftovers: tuple[str, ...] = ()  # what CLEANUP could not remove


@dataclass(frozen=True)
class Failed:
    error: str
    refused: bool = False  # the agent answered that nothing changed
    moved: bool = False  # the inventory has the VM on the destination: only forward


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class Restarted:
    pass


Event = Succeeded | Failed | Cancel | Restarted


@dataclass(frozen=True)
class CStep:
    state: ColdState
    action: CAction
    note: str | None = None


def first(copying: bool) -> CStep:
    """The source holds the VM first (no start there until the move ends), and exports its
    disks when they are copied."""
    what = "exporting the disks" if copying else "holding the VM on its source"
    return CStep(ColdState(CPhase.EXPORT, copying), CAction.EXPORT, what)


def _rollback(s: ColdState, error: str | None, note: str) -> CStep:
    return CStep(replace(s, phase=CPhase.ROLLBACK, error=error, failures=0), CAction.ABORT, note)


def _retry_or(s: ColdState, error: str, then: CStep, action: CAction) -> CStep:
    failures = s.failures + 1
    if failures >= MAX_TRIES:
        return then
    return CStep(replace(s, failures=failures), action, error)


def step(s: ColdState, event: Event) -> CStep:
    """The next state and action; pure."""
    if s.phase.final:
        return CStep(s, CAction.NONE)
    if isinstance(event, Cancel):
        s = replace(s, cancel=True)
        if s.phase in (CPhase.EXPORT, CPhase.COPY):
            return _rollback(s, None, "cancel: the VM stays on its source")
        return CStep(s, _again(s), "cancel asked: too late, the destination has the VM")
    if isinstance(event, Failed) and event.moved and s.phase != CPhase.CLEANUP:
        why = f"the VM is on the destination already: going forward ({event.error})"
        return CStep(
            replace(s, phase=CPhase.CLEANUP, failures=0, warnings=(*s.warnings, why)),
            CAction.CLEANUP,
            why,
        )
    if isinstance(event, Restarted):
        if s.phase in (CPhase.EXPORT, CPhase.COPY):
            return _rollback(s, "the manager restarted during the copy", "rolling back")
        return CStep(replace(s, failures=0), _again(s), "manager restarted: resuming")
    match s.phase, event:
        case CPhase.EXPORT, Succeeded() if s.copying:
            return CStep(replace(s, phase=CPhase.COPY, failures=0), CAction.COPY, "copying")
        case CPhase.EXPORT, Succeeded():
            return CStep(
                replace(s, phase=CPhase.DEFINE, failures=0),
                CAction.DEFINE,
                "moving the definition (the disks stay where both hosts reach them)",
            )
        case CPhase.COPY, Succeeded(disks=disks):
            return CStep(
                replace(s, phase=CPhase.DEFINE, disks=disks, failures=0),
                CAction.DEFINE,
                "copies verified: defining the VM on the destination",
            )
        case ((CPhase.EXPORT | CPhase.COPY), Failed(error=error)):
            return _rollback(s, error, f"failed: {error}")
        case CPhase.DEFINE, Succeeded():
            return CStep(replace(s, phase=CPhase.CLEANUP, failures=0), CAction.CLEANUP)
        case CPhase.DEFINE, Failed(error=error, refused=True):
            return _rollback(s, error, f"the destination refused the VM: {error}")
        case CPhase.DEFINE, Failed(error=error):
            # Its answer may be lost: asked again (defining the same VM twice is answered
            # as done); after that the move is rolled back only if it was never defined.
            return _retry_or(
                s,
                error,
                _rollback(s, error, f"the destination does not answer: {error}"),
                CAction.DEFINE,
            )
        case CPhase.CLEANUP, Succeeded(leftovers=leftovers):
            warnings = s.warnings + tuple(f"left on the source: {x}" for x in leftovers)
            return CStep(replace(s, phase=CPhase.DONE, warnings=warnings), CAction.NONE, "done")
        case CPhase.CLEANUP, Failed(error=error):
            warning = f"the source still has the old definition or files: {error}"
            done = CStep(
                replace(s, phase=CPhase.DONE, warnings=(*s.warnings, warning)),
                CAction.NONE,
                warning,
            )
            return _retry_or(s, error, done, CAction.CLEANUP)
        case CPhase.ROLLBACK, Succeeded():
            final = CPhase.CANCELLED if s.cancel and s.error is None else CPhase.FAILED
            return CStep(
                replace(s, phase=final), CAction.NONE, "rolled back: the VM is on its source"
            )
        case CPhase.ROLLBACK, Failed(error=error):
            warning = f"rollback incomplete (copies may be left on the destination): {error}"
            failed = CStep(
                replace(
                    s, phase=CPhase.FAILED, error=s.error or error, warnings=(*s.warnings, warning)
                ),
                CAction.NONE,
                warning,
            )
            return _retry_or(s, error, failed, CAction.ABORT)
    return CStep(s, _again(s))


def _again(s: ColdState) -> CAction:
    return {
        CPhase.EXPORT: CAction.EXPORT,
        CPhase.COPY: CAction.COPY,
        CPhase.DEFINE: CAction.DEFINE,
        CPhase.CLEANUP: CAction.CLEANUP,
        CPhase.ROLLBACK: CAction.ABORT,
    }.get(s.phase, CAction.NONE)


# ------------------------------------------------------------------ the loop


class ColdPortError(Exception):
    def __init__(self, message: str, *, refused: bool = False, moved: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.moved = moved


class ColdPort(Protocol):
    async def export(self, copying: bool) -> None: ...
    async def copy(self) -> tuple[Disk, ...]: ...
    async def define(self, disks: tuple[Disk, ...]) -> None: ...
    async def cleanup(self, copied: bool) -> tuple[str, ...]: ...
    async def abort(self) -> None: ...


Persist = Callable[[CStep], Awaitable[None]]


async def run(
    port: ColdPort,
    persist: Persist,
    cancel: asyncio.Event,
    start: CStep,
    retry_s: float = 2.0,
    guard: Callable[[], Awaitable[None]] | None = None,
) -> ColdState:
    st = start
    cancel_seen = False
    while True:
        await persist(st)
        if st.action == CAction.NONE:
            return st.state
        if cancel.is_set() and not cancel_seen:
            cancel_seen = True
            st = step(st.state, Cancel())
            continue
        if st.state.failures:
            await asyncio.sleep(retry_s)
        if guard is not None:
            await guard()  # may the caller still act? (it stops the run here if not)
        try:
            event: Event
            if st.action == CAction.EXPORT:
                await port.export(st.state.copying)
                event = Succeeded()
            elif st.action == CAction.COPY:
                event = Succeeded(disks=await port.copy())
            elif st.action == CAction.DEFINE:
                await port.define(st.state.disks)
                event = Succeeded()
            elif st.action == CAction.CLEANUP:
                event = Succeeded(leftovers=await port.cleanup(st.state.copying))
            else:
                await port.abort()
                event = Succeeded()
        except ColdPortError as exc:
            event = Failed(str(exc), refused=exc.refused, moved=exc.moved)
        st = step(st.state, event)


def state_to_json(s: ColdState) -> dict[str, object]:
    return {
        "kind": "cold",
        "phase": s.phase.value,
        "copying": s.copying,
        "disks": [d.model_dump(mode="json") for d in s.disks],
        "cancel": s.cancel,
        "error": s.error,
        "warnings": list(s.warnings),
    }


def state_from_json(d: dict[str, object]) -> ColdState:
    disks = d.get("disks") or []
    warnings = d.get("warnings") or []
    assert isinstance(disks, list) and isinstance(warnings, list)
    return ColdState(
        phase=CPhase(str(d["phase"])),
        copying=bool(d.get("copying")),
        disks=tuple(Disk.model_validate(x) for x in disks),
        cancel=bool(d.get("cancel")),
        error=str(d["error"]) if d.get("error") else None,
        warnings=tuple(str(w) for w in warnings),
    )
