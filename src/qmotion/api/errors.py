"""The error body every qmotion HTTP API returns, so clients can act on fields, not text."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class AgentErrorCode(StrEnum):
    """The ``code`` of an agent's error body: one enum for the agent that raises it and the
    manager that acts on it (a rollback goes forward on ``MIGRATED_AWAY``, say)."""

    AGENT_ERROR = "agent_error"
    REFUSED = "refused"
    FORBIDDEN = "forbidden"  # a peer that is not the one named for this VM's migration
    VM_NOT_FOUND = "vm_not_found"
    CONFLICT = "conflict"
    MIGRATED_AWAY = "migrated_away"  # the VM completed a migration away; it runs elsewhere
    IN_POSTCOPY = "in_postcopy"  # the source is in postcopy: never resumed or cancelled
    ALREADY_SWITCHED = "already_switched"  # a storage move's disks switched: go forward
    PEER_UNREACHABLE = "peer_unreachable"  # no address of the peer agent answers
    # This copy went away in another (earlier) migration: it is never resumed or released
    # for this one, whatever QEMU's status says.
    STALE_COPY = "stale_copy"
    SPEC_REJECTED = "spec_rejected"
    OPERATION_FAILED = "operation_failed"


class ErrorDetail(BaseModel):
    code: str
    message: str
    vm: str | None = None
    host: str | None = None
    field: str | None = None
    qmp_class: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def describe(d: ErrorDetail) -> str:
    """An error as one line for a person, the same in the CLI and the console: the message,
    where it applies, and its code."""
    where = ", ".join(
        f"{k}={v}"
        for k, v in (("vm", d.vm), ("host", d.host), ("field", d.field), ("qmp", d.qmp_class))
        if v
    )
    return f"{d.message}" + (f" ({where})" if where else "") + f" [{d.code}]"
