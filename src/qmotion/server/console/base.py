"""What every console route shares: the manager's services, the caller, form checks, errors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from qmotion.api.errors import ErrorDetail, describe
from qmotion.api.service import domain_detail, validation_detail
from qmotion.server.access import Access, required_role
from qmotion.server.automation.actions import ManagerActions
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.maintenance import Maintenance
from qmotion.server.automation.schedules import Schedules
from qmotion.server.console import session
from qmotion.server.console.render import Caller, Renderer
from qmotion.server.console.session import Sessions
from qmotion.server.errors import Forbidden, ManagerError
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner

TITLES = {403: "Not allowed", 404: "Not found", 409: "Refused", 422: "Invalid", 502: "Host failed"}


@dataclass
class Console:
    """The service objects the API's routes use, and the console's own parts."""

    inventory: Inventory
    runner: TaskRunner
    drs: ClusterDrs
    maintenance: Maintenance
    schedules: Schedules
    actions: ManagerActions
    access: Access
    sessions: Sessions
    render: Renderer

    def caller(self, request: Request) -> Caller:
        """The signed-in caller (raises session.SignedOut)."""
        who, sess = self.sessions.caller(request)
        return Caller(who, sess.csrf)

    async def form(self, request: Request) -> tuple[Caller, session.Form]:
        """A state-changing request: signed in, from our own page, with the session's CSRF
        token; its form."""
        who, sess = await asyncio.to_thread(self.sessions.caller, request)
        form = await session.read_form(request)
        session.check_csrf(request, sess, form)
        return Caller(who, sess.csrf), form


def allowed(caller: Caller, method: str, route: str) -> None:
    """The API's own role check for the route a console action stands for."""
    if not caller.can(method, route):
        # The API's own words for the same refusal.
        raise Forbidden(
            f"{caller.who.user} is {caller.who.role.value}; {method} {route} needs "
            f"{required_role(method, route).value}"
        )


def detail(exc: Exception) -> tuple[int, ErrorDetail]:
    """An error as the API would answer it: the status and the error body."""
    if isinstance(exc, ManagerError):
        return exc.status, domain_detail(exc)
    if isinstance(exc, ValidationError):
        return 422, validation_detail(exc.errors(), whole="input")
    raise exc


def refused(exc: Exception) -> dict[str, Any]:
    """Template context for a refused action: the line the CLI prints and the field named."""
    status, d = detail(exc)
    return {
        "error": describe(d),
        "error_title": TITLES.get(status, "Failed"),
        "field": d.field,
        "status": status,
    }
