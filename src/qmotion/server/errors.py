"""Errors of the manager, each mapped to one HTTP status.

ServerError
 ├── NotFound      404  no such host, VM or task
 ├── Conflict      409  the cluster's state forbids it now (refused; nothing changed)
 ├── Invalid       422  the request is wrong (refused; nothing changed; names the field)
 └── Upstream      502  an agent failed or could not be reached while acting
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class ServerError(QmotionError):
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


class NotFound(ServerError):
    status = 404
    code = "not_found"


class Conflict(ServerError):
    status = 409
    code = "conflict"


class Invalid(ServerError):
    status = 422
    code = "invalid"


class Upstream(ServerError):
    status = 502
    code = "agent_error"
