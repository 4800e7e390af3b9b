"""Runs the migration state machine: performs each action through a narrow port, feeds the
outcome back, and persists every step. All I/O is behind ``MigrationPort``.

qmotion's own errors from an action are events the machine decides on. Anything else (a
database error in a step or in ``persist``, a bug) never ends a migration while QEMU may be
moving it: the same action, or the same persist, is tried again after a backoff, and a
manager that restarts meanwhile resumes from the persisted state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from qmotion.api.migration import MigrationStats, QemuMigrationStatus
from qmotion.errors import QmotionError
from qmotion.migration.errors import (
    DestinationNotRunning,
    InPostcopy,
    StepError,
    SwitchedOver,
)
from qmotion.migration.machine import step
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
    RecoverPostcopy,
    Restarted,
    Rollback,
    RunPrechecks,
    StartMigration,
    Step,
    Succeeded,
    UpdateInventory,
    delay_of,
)

log = logging.getLogger(__name__)
ERROR_BACKOFF_FIRST_S = 1.0  # after an unexpected error: 1 s, doubling, at most 30 s
ERROR_BACKOFF_MAX_S = 30.0
# Before anything was made an unexpected error ends the task: nothing moves to protect.
UNTOUCHED = frozenset({Phase.PENDING, Phase.PRECHECK})


class MigrationPort(Protocol):
    """Everything the engine needs from the world, for one migration. ``postcopy_requested``:
    the port asked QEMU for postcopy (it persisted that first)."""

    postcopy_requested: bool

    async def prechecks(self) -> None: ...
    async def prepare_destination(self) -> str: ...
    async def mirror_disks(self) -> bool: ...
    async def start_migration(self, uri: str) -> None: ...
    async def progress(self, known_status: QemuMigrationStatus | None) -> MigrationStats: ...
    async def finish_destination(self) -> None: ...
    async def announce(self) -> None: ...
    async def confirm_source(self) -> None: ...
    async def update_inventory(self) -> None: ...
    async def rollback(
        self, cancel_migration: bool, teardown_destination: bool, stop_mirror: bool
    ) -> None: ...
    async def recover(self) -> None: ...
    async def recover_postcopy(self) -> None: ...


Persist = Callable[[Step, MigrationStats | None], Awaitable[None]]
# Awaited before each action on the hosts: the caller may stop the run there (by
# cancelling it), when it may no longer act (a manager replica that lost its lease).
Guard = Callable[[], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


async def _perform(port: MigrationPort, action: object) -> tuple[Event, MigrationStats | None]:
    """One action; its outcome as an event. Only qmotion's own errors become ``Failed``;
    any other exception passes (``run`` retries the action)."""
    try:
        match action:
            case RunPrechecks():
                await port.prechecks()
            case PrepareDestination():
                return Succeeded(uri=await port.prepare_destination()), None
            case MirrorDisks():
                return MirrorProgress(await port.mirror_disks()), None
            case StartMigration(uri=uri):
                await port.start_migration(uri)
            case AwaitProgress(known_status=known):
                stats = await port.progress(known)
                asked = port.postcopy_requested
                return Progress(stats.status, stats.error, postcopy_requested=asked), stats
            case FinishDestination():
                await port.finish_destination()
            case Announce():
                await port.announce()
            case ConfirmSource():
                await port.confirm_source()
            case UpdateInventory():
                await port.update_inventory()
            case Rollback(cancel_migration=cm, teardown_destination=td, stop_mirror=sm):
                await port.rollback(cm, td, sm)
            case Recover():
                await port.recover()
            case RecoverPostcopy():
                await port.recover_postcopy()
            case _:
                raise AssertionError(f"unknown action {action!r}")
    except InPostcopy:
        return Progress(QemuMigrationStatus.POSTCOPY_ACTIVE), None
    except SwitchedOver:
        return Progress(QemuMigrationStatus.COMPLETED), None
    except DestinationNotRunning as exc:
        return Failed(str(exc), retryable=False, not_running=True), None
    except StepError as exc:
        return Failed(str(exc), retryable=exc.retryable), None
    except QmotionError as exc:
        return Failed(str(exc)), None
    return Succeeded(), None


async def run(
    port: MigrationPort,
    persist: Persist,
    cancel: asyncio.Event,
    state: MigrationState | None = None,
    *,
    copy_disks: bool = False,
    migration_id: str | None = None,
    sleep: Sleep = asyncio.sleep,
    guard: Guard | None = None,
) -> MigrationState:
    """Drive one migration to a terminal state. ``cancel`` asks for a rollback; asyncio
    cancellation (a shutting-down manager) is not caught. Given a ``state`` (persisted by a
    manager that then restarted), the migration resumes from it. ``copy_disks``: a
    shared-nothing migration (the disks are mirrored first); ``migration_id``: the id every
    agent call carries; ``sleep``: the backoffs' (the machine decides them, this has the
    clock)."""
    current = (
        step(state, Restarted())
        if state is not None
        else step(MigrationState(), Begin(copy_disks=copy_disks, migration_id=migration_id))
    )
    await _save(persist, current, None, sleep)
    errors = 0
    while not isinstance(current.action, Finish):
        if cancel.is_set() and not current.state.cancel_requested:
            current = step(current.state, CancelRequested())
            await _save(persist, current, None, sleep)
            continue
        if delay_of(current.action) > 0:
            await sleep(delay_of(current.action))
        if guard is not None:
            await guard()  # after the wait: the right to act is checked as it acts
        try:
            event, stats = await _perform_or_cancel(port, current.action, cancel)
        except Exception as exc:  # not qmotion's (those are events); never CancelledError
            if current.state.phase in UNTOUCHED:
                event, stats = Failed(f"internal error: {exc}"), None
            else:
                errors += 1
                await _retry_later(persist, current, exc, errors, sleep)
                continue
        errors = 0
        current = step(current.state, event)
        await _save(persist, current, stats, sleep)
    return current.state


def _error_backoff(errors: int) -> float:
    return float(min(ERROR_BACKOFF_FIRST_S * 2.0 ** (errors - 1), ERROR_BACKOFF_MAX_S))


async def _retry_later(
    persist: Persist, current: Step, exc: Exception, errors: int, sleep: Sleep
) -> None:
    """An unexpected error in the current action: recorded (best effort), then a backoff
    before the same action again."""
    wait = _error_backoff(errors)
    log.error(
        "migration step %s failed unexpectedly (again in %.0f s)",
        type(current.action).__name__,
        wait,
        exc_info=exc,
    )
    note = f"{current.state.phase.value}: unexpected error, retrying in {wait:g} s: {exc!r}"
    try:
        await persist(replace(current, note=note), None)
    except Exception:  # the record is best effort: the retry is what matters
        log.exception("could not record the error")
    await sleep(wait)


async def _save(
    persist: Persist, current: Step, stats: MigrationStats | None, sleep: Sleep
) -> None:
    """Persist one step; a failure (the database) is retried after a backoff until it is
    recorded: the action it follows is not done again."""
    errors = 0
    while True:
        try:
            await persist(current, stats)
            return
        except Exception as exc:  # never CancelledError: a shutdown stops here
            errors += 1
            wait = _error_backoff(errors)
            log.error("could not persist a migration step (again in %.0f s)", wait, exc_info=exc)
            await sleep(wait)


async def _perform_or_cancel(
    port: MigrationPort, action: object, cancel: asyncio.Event
) -> tuple[Event, MigrationStats | None]:
    """Waiting for progress is interruptible by a cancel; every other action completes."""
    if not isinstance(action, AwaitProgress) or cancel.is_set():
        return await _perform(port, action)
    work = asyncio.ensure_future(_perform(port, action))
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work in done:
        return work.result()
    work.cancel()
    return CancelRequested(), None
