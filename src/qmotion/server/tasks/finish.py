"""libvirt's Finish and Confirm for one live migration, by its id: the word that lets the
paused destination run and seeing it run (Finish), its confirmation there (announce and
keep-disks), and the source letting its copy go (Confirm).

Past the switchover the destination may run the VM at any moment (the source agent gives the
word itself when its QEMU completes), so nothing here ever concludes "it does not run" from a
call that failed: only the destination agent's own answer (no such VM, QEMU stopped or
crashed, its incoming migration failed) is ``DestinationNotRunning``; everything else is a
``StepError`` the machine retries with backoff.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from qmotion.api.errors import AgentErrorCode
from qmotion.api.vm import VmInfo, VmState
from qmotion.client.errors import ApiError, ClientError, Conflict, NotFound
from qmotion.migration.errors import DestinationNotRunning, StepError
from qmotion.server.tasks.ends import Ends
from qmotion.server.tasks.flight import FlightRecorder

VERIFY_TIMEOUT_S = 30.0  # a destination given the word that does not run by then: asked again
VERIFY_POLL_S = 0.02
FINISH_WAIT_MS = 2000  # the agent waits this long for the VM to run before it answers
NOT_RUNNING = frozenset({VmState.STOPPED, VmState.CRASHED})
STEP = "verify destination"


class Commit:
    """The steps that commit one migration, through its ``ends`` (``ends.migration`` is its
    id); ``clock`` and ``sleep`` are the port's."""

    def __init__(
        self,
        ends: Ends,
        flight: FlightRecorder,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.ends, self.flight, self._clock, self._sleep = ends, flight, clock, sleep
        self.vm, self.migration = ends.vm, ends.migration
        self.source, self.destination = ends.src.name, ends.dst.name

    # ------------------------------------------------------------------ Finish

    async def finish_destination(self) -> None:
        """The word (the source completed this migration: the destination may run), then the
        destination seen running, or an error: ``DestinationNotRunning`` only when its agent
        says so, a ``StepError`` otherwise (it may run, or be about to)."""
        deadline = self._clock() + VERIFY_TIMEOUT_S
        info = await self._word()
        while True:
            if info is None:
                info = await self.ends.destination_vm(STEP)
            if info is None:
                raise DestinationNotRunning(
                    f"host {self.destination}: no VM {self.vm} there",
                    vm=self.vm,
                    host=self.destination,
                )
            if info.state == VmState.RUNNING:
                if info.incoming_migration not in (None, self.migration):
                    raise StepError(
                        STEP,
                        f"host {self.destination} runs {self.vm} of migration "
                        f"{info.incoming_migration}, not of this one",
                        vm=self.vm,
                        host=self.destination,
                    )
                break
            if info.state in NOT_RUNNING:
                raise DestinationNotRunning(
                    f"the destination QEMU is {info.state} ({info.qemu_status})",
                    vm=self.vm,
                    host=self.destination,
                )
            if self._clock() > deadline:
                raise StepError(
                    STEP,
                    f"the destination is {info.state} ({info.qemu_status}) "
                    f"{VERIFY_TIMEOUT_S:.0f} s after the word to run",
                    vm=self.vm,
                    host=self.destination,
                )
            await self._sleep(VERIFY_POLL_S)
            info = None
        # For the report only: whatever fails here, the destination runs the VM.
        with contextlib.suppress(StepError):
            stats = await self.ends.destination(
                "report", lambda c: c.migration(self.vm, migration=self.migration), 5.0
            )
            self.flight.destination_events = stats.events

    async def _word(self) -> VmInfo | None:
        """The word to the destination; what it answered, or None to look at the VM (the
        word was refused: not this migration's VM, or its incoming migration failed)."""
        if self.migration is None:
            return None
        migration = self.migration
        try:
            return await self.ends.destination_raw(
                lambda c: c.finish_migration(self.vm, migration, wait_ms=FINISH_WAIT_MS),
                timeout_s=FINISH_WAIT_MS / 1000 + 30,
            )
        except NotFound as exc:
            if exc.detail.code == AgentErrorCode.VM_NOT_FOUND:
                raise DestinationNotRunning(
                    f"host {self.destination}: {exc}", vm=self.vm, host=self.destination
                ) from exc
            return None
        except Conflict:
            return None
        except ClientError as exc:
            raise StepError(
                STEP, f"host {self.destination}: {exc}", vm=self.vm, host=self.destination
            ) from exc

    # ------------------------------------------------------------------ after it ran

    async def confirm_destination(self) -> None:
        """The VM runs on the destination: it is confirmed there (its copied disks are its
        own, its incoming record goes), then announced on the network."""
        try:
            await self.ends.destination_raw(
                lambda c: c.keep_disks(self.vm, migration=self.migration)
            )
        except Conflict as exc:
            # Confirmed already (an answer lost on the way)? Then the VM runs there and no
            # longer names an incoming migration.
            info = await self.ends.destination_vm("announce")
            if info is None or info.state != VmState.RUNNING or info.incoming_migration:
                raise StepError("announce", f"host {self.destination}: {exc}", vm=self.vm) from exc
        except ClientError as exc:
            raise StepError(
                "announce", f"host {self.destination}: {exc}", vm=self.vm, host=self.destination
            ) from exc
        await self.ends.destination("announce", lambda c: c.announce(self.vm))

    async def confirm_source(self) -> None:
        """libvirt's Confirm: the source lets the VM go (its QEMU ends, the old disks of a
        shared-nothing migration with it). A VM no longer there was let go already."""
        try:
            await self.ends.source_raw(lambda c: c.release(self.vm, migration=self.migration))
        except NotFound as exc:
            if exc.detail.code != AgentErrorCode.VM_NOT_FOUND:
                raise self._stop_error(exc, retryable=True) from exc
        except ApiError as exc:
            # Refused (409: not this migration's completed copy): asking again cannot help.
            raise self._stop_error(exc, retryable=exc.status >= 500) from exc
        except ClientError as exc:
            raise self._stop_error(exc, retryable=True) from exc

    def _stop_error(self, exc: ClientError, *, retryable: bool) -> StepError:
        return StepError(
            "stop source",
            f"host {self.source}: {exc}",
            vm=self.vm,
            host=self.source,
            retryable=retryable,
        )
