"""Errors of the host agent, each mapped to one HTTP status.

AgentError
 ├── Refused                 refused before anything changed
 │    ├── VmNotFound         404: no VM by that name on this host
 │    ├── Conflict           409: the VM's state forbids it (running, exists, busy)
 │    │    ├── MigratedAway  409: the VM completed a migration away; it runs elsewhere now
 │    │    ├── InPostcopy    409: the VM is in postcopy away: never resumed or cancelled here
 │    │    ├── AlreadySwitched 409: a storage move's disks switched: never rolled back
 │    │    └── PeerUnreachable 409: no address of the peer agent answers
 │    └── SpecRejected       422: the spec cannot run here (names the field and why)
 └── OperationFailed         500: failed partway; what was cleaned up is in the message
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class AgentError(QmotionError):
    status = 500
    code = "agent_error"

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
    code = "refused"


class VmNotFound(Refused):
    status = 404
    code = "vm_not_found"

    def __init__(self, vm: str) -> None:
        super().__init__(f"no VM named {vm!r} on this host", vm=vm)


class Conflict(Refused):
    status = 409
    code = "conflict"


class MigratedAway(Conflict):
    """Callers (the manager's rollback) read this code as "the destination owns the VM"."""

    code = "migrated_away"


class InPostcopy(Conflict):
    """Callers (the manager's rollback) read this code as "going forward, never resumed"."""

    code = "in_postcopy"


class AlreadySwitched(Conflict):
    """A storage move's rollback asked after the disks switched: callers go forward."""

    code = "already_switched"


class PeerUnreachable(Conflict):
    """Callers (the manager's route choice) read this code as "refuse, nothing started"."""

    code = "peer_unreachable"


class SpecRejected(Refused):
    status = 422
    code = "spec_rejected"


class OperationFailed(AgentError):
    status = 500
    code = "operation_failed"
