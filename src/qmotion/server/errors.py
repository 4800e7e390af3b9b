"""Errors of the manager, each mapped to one HTTP status.

ManagerError
 ├── Forbidden     403  the caller's role may not do this (refused; nothing changed)
 ├── NotFound      404  no such host, VM or task
 ├── Conflict      409  the cluster's state forbids it now (refused; nothing changed)
 ├── Invalid       422  the request is wrong (refused; nothing changed; names the field)
 ├── Upstream      502  an agent failed or could not be reached while acting
 ├── LeaseLost     500  (internal) another replica owns the task now: this one stops its work
 │                      on it at once, without touching the hosts again
 └── NameTaken     500  (at start) another live manager process holds this replica's name
"""

from __future__ import annotations

from collections.abc import Sequence

from qmotion.errors import QmotionError
from qmotion.migration.prechecks import Refusal


class ManagerError(QmotionError):
    status = 500
    code = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        vm: str | None = None,
        host: str | None = None,
        field: str | None = None,
        qmp_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.vm, self.host, self.field, self.qmp_class = vm, host, field, qmp_class


class Forbidden(ManagerError):
    status = 403
    code = "forbidden"


class NotFound(ManagerError):
    status = 404
    code = "not_found"


class Conflict(ManagerError):
    status = 409
    code = "conflict"


class Invalid(ManagerError):
    status = 422
    code = "invalid"


class Upstream(ManagerError):
    status = 502
    code = "agent_error"


class LeaseLost(ManagerError):
    code = "lease_lost"

    def __init__(self, task_id: int, owner: str | None) -> None:
        super().__init__(f"task {task_id} is owned by replica {owner or 'none'} now")
        self.task_id, self.owner = task_id, owner


class NameTaken(ManagerError):
    code = "replica_name_taken"


def raise_refusals(refusals: Sequence[Refusal], vm: str) -> None:
    """Pre-check refusals as one error (409 if any is a conflict, else 422), named by the
    first; nothing when there are none."""
    if not refusals:
        return
    first = refusals[0]
    cls = Conflict if any(r.status == 409 for r in refusals) else Invalid
    raise cls(
        "; ".join(r.message for r in refusals),
        code=first.code,
        vm=vm,
        host=first.host,
        field=first.field,
    )
