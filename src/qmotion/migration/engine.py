"""Runs the migration state machine: performs each action through a narrow port, feeds the
outcome back, and persists every step. All I/O is behind ``MigrationPort``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from qmotion.api.migration import MigrationStats, QemuMigrationStatus
from qmotion.migration.errors import InPostcopy, MigrationError, StepError, SwitchedOver
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
)


class MigrationPort(Protocol):
    """Everything the engine needs from the world, for one migration."""

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


async def _perform(port: MigrationPort, action: object) -> tuple[Event, MigrationStats | None]:
    """One action; its outcome as an event. Only qmotion's own errors become ``Failed``."""
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
                return Progress(stats.status, stats.error), stats
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
    except StepError as exc:
        return Failed(str(exc), retryable=exc.retryable), None
    except MigrationError as exc:
        return Failed(str(exc)), None
    return Succeeded(), None


async def run(
    port: MigrationPort,
    persist: Persist,
    cancel: asyncio.Event,
    state: MigrationState | None = None,
    *,
    copy_disks: bool = False,
) -> MigrationState:
    """Drive one migration to a terminal state. ``cancel`` asks for a rollback; asyncio
    cancellation (a shutting-down manager) is not caught. Given a ``state`` (persisted by a
    manager that then restarted), the migration resumes from it. ``copy_disks``: a
    shared-nothing migration (the disks are mirrored first)."""
    current = (
        step(state, Restarted())
        if state is not None
        else step(MigrationState(), Begin(copy_disks=copy_disks))
    )
    await persist(current, None)
    while not isinstance(current.action, Finish):
        if cancel.is_set() and not current.state.cancel_requested:
            current = step(current.state, CancelRequested())
            await persist(current, None)
            continue
        event, stats = await _perform_or_cancel(port, current.action, cancel)
        current = step(current.state, event)
        await persist(current, stats)
    return current.state


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
