"""Errors of the migration engine.

MigrationError
 ├── Refused          pre-checks said no; nothing was touched (carries the refusals)
 ├── StepError        an action failed partway; the state machine decides what is undone
 │    └── DestinationNotRunning   the destination agent itself says the VM does not run
 └── SwitchedOver     a rollback found QEMU had already switched over: go forward instead
      └── InPostcopy   ... into postcopy: the destination runs, the source still holds pages
"""

from __future__ import annotations

from qmotion.errors import QmotionError
from qmotion.migration.prechecks import Refusal


class MigrationError(QmotionError):
    """Root of the migration engine's errors."""


class Refused(MigrationError):
    def __init__(self, vm: str, refusals: list[Refusal]) -> None:
        super().__init__("; ".join(r.message for r in refusals))
        self.vm = vm
        self.refusals = refusals

    @property
    def status(self) -> int:
        return 409 if any(r.status == 409 for r in self.refusals) else 422


class StepError(MigrationError):
    """``retryable``: False when asking again cannot help (a timeout ran out, a stall)."""

    def __init__(
        self,
        step: str,
        message: str,
        *,
        vm: str | None = None,
        host: str | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.vm = vm
        self.host = host
        self.retryable = retryable


class DestinationNotRunning(StepError):
    """The destination agent itself answered that the VM does not run there and cannot (not
    found, QEMU stopped or crashed, its incoming migration failed): the one failure of the
    Finish step after which the source may be resumed. An agent that does not answer, or
    answers with an error, never says this."""

    def __init__(self, message: str, *, vm: str | None = None, host: str | None = None) -> None:
        super().__init__("verify destination", message, vm=vm, host=host, retryable=False)


class SwitchedOver(MigrationError):
    """QEMU completed the migration although the manager lost track (e.g. a monitor call
    failed right at switchover): undoing now would destroy the only running copy."""


class InPostcopy(SwitchedOver):
    """The migration switched to postcopy: the destination runs the VM while the source
    still holds pages it has not sent. Neither copy may be removed until QEMU completes."""
