"""Errors of the host agent, each mapped to one HTTP status.

AgentError
 ├── Refused                 refused before anything changed
 │    ├── Forbidden          403: a peer host other than the one named for the migration
 │    ├── VmNotFound         404: no VM by that name on this host
 │    ├── Conflict           409: the VM's state forbids it (running, exists, busy)
 │    │    ├── MigratedAway  409: the VM completed a migration away; it runs elsewhere now
 │    │    ├── InPostcopy    409: the VM is in postcopy away: never resumed or cancelled here
 │    │    ├── StaleCopy     409: this copy went away in another migration: never resumed
 │    │    ├── AlreadySwitched 409: a storage move's disks switched: never rolled back
 │    │    └── PeerUnreachable 409: no address of the peer agent answers
 │    └── SpecRejected       422: the spec cannot run here (names the field and why)
 └── OperationFailed         500: failed partway; what was cleaned up is in the message
"""

from __future__ import annotations

from qmotion.api.errors import AgentErrorCode
from qmotion.errors import QmotionError
from qmotion.hypervisor.errors import HypervisorError


class AgentError(QmotionError):
    status = 500
    code: AgentErrorCode = AgentErrorCode.AGENT_ERROR

    def __init__(
        self,
        message: str,
        *,
        vm: str | None = None,
        field: str | None = None,
        qmp_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.vm = vm
        self.field = field
        self.qmp_class = qmp_class


class Refused(AgentError):
    status = 409
    code = AgentErrorCode.REFUSED


class Forbidden(Refused):
    status = 403
    code = AgentErrorCode.FORBIDDEN


class VmNotFound(Refused):
    status = 404
    code = AgentErrorCode.VM_NOT_FOUND

    def __init__(self, vm: str) -> None:
        super().__init__(f"no VM named {vm!r} on this host", vm=vm)


class Conflict(Refused):
    status = 409
    code = AgentErrorCode.CONFLICT


class MigratedAway(Conflict):
    """Callers (the manager's rollback) read this code as "the destination owns the VM"."""

    code = AgentErrorCode.MIGRATED_AWAY


class InPostcopy(Conflict):
    """Callers (the manager's rollback) read this code as "going forward, never resumed"."""

    code = AgentErrorCode.IN_POSTCOPY


class StaleCopy(Conflict):
    """Asked about one migration, this copy went away in another: it is never resumed or
    released for this one, and never taken for this one's switchover."""

    code = AgentErrorCode.STALE_COPY


class AlreadySwitched(Conflict):
    """A storage move's rollback asked after the disks switched: callers go forward."""

    code = AgentErrorCode.ALREADY_SWITCHED


class PeerUnreachable(Conflict):
    """Callers (the manager's route choice) read this code as "refuse, nothing started"."""

    code = AgentErrorCode.PEER_UNREACHABLE


class SpecRejected(Refused):
    status = 422
    code = AgentErrorCode.SPEC_REJECTED


class OperationFailed(AgentError):
    status = 500
    code = AgentErrorCode.OPERATION_FAILED

    @classmethod
    def of(
        cls, exc: HypervisorError, *, vm: str | None = None, what: str | None = None
    ) -> OperationFailed:
        """QEMU (or qemu-img) failed: the agent's error body, with QMP's error class when
        there is one, not a bare 500. The one place the agent translates its hypervisor's
        errors; ``what`` names the step (``"{what} failed: ..."``)."""
        message = f"{what} failed: {exc}" if what else str(exc)
        return cls(message, vm=vm, qmp_class=getattr(exc, "qmp_class", None))
