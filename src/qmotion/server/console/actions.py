"""The console's forms that change something: each the API route it stands for, role-checked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from qmotion.api.drs import ApplyRequest, RuleCreate
from qmotion.api.schedule import ScheduleCreate
from qmotion.api.server import TaskOut
from qmotion.server.access import TASK_ID
from qmotion.server.console import pages
from qmotion.server.console.base import Console, allowed, refused
from qmotion.server.console.pages import Name, TaskId
from qmotion.server.console.render import Caller
from qmotion.server.console.session import Form
from qmotion.server.errors import Invalid, ManagerError


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.replace("\n", ",").split(",") if n.strip()]


def install_actions(app: FastAPI, c: Console) -> None:
    def redo(
        caller: Caller, template: str, context: Callable[[], dict[str, Any]], exc: Exception
    ) -> Response:
        """The page again with the refusal, as the CLI words it, and the form as it was."""
        err = refused(exc)
        return c.render.page(template, caller, {**context(), **err}, int(err["status"]))

    @app.post("/ui/tasks/{task_id}/cancel", include_in_schema=False)
    async def cancel(request: Request, task_id: TaskId) -> Response:
        caller, _form = await c.form(request)
        try:
            allowed(caller, "POST", "/v1/tasks/{task_id}/cancel")
            c.runner.cancel(task_id)  # on the loop: it signals the running task
        except ManagerError as exc:
            task = await asyncio.to_thread(pages.or_404, c, caller, lambda: c.runner.get(task_id))
            if not isinstance(task, TaskOut):
                return task
            return redo(caller, "task.html", lambda: pages.task_context(task), exc)
        return RedirectResponse(f"/ui/tasks/{task_id}", status_code=303)

    @app.post("/ui/hosts/{name}/maintenance", include_in_schema=False)
    async def maintenance_enter(request: Request, name: Name) -> Response:
        caller, _form = await c.form(request)
        try:
            allowed(caller, "POST", "/v1/hosts/{name}/maintenance")
            out = c.maintenance.enter(name)  # on the loop: it starts the evacuation's task
        except ManagerError as exc:
            return await _host_again(c, caller, name, exc)
        if out.task_id is None:
            return RedirectResponse(f"/ui/hosts/{name}", status_code=303)
        request.scope[TASK_ID] = out.task_id
        return RedirectResponse(f"/ui/tasks/{out.task_id}", status_code=303)

    @app.post("/ui/hosts/{name}/maintenance/exit", include_in_schema=False)
    async def maintenance_exit(request: Request, name: Name) -> Response:
        caller, form = await c.form(request)
        try:
            allowed(caller, "POST", "/v1/hosts/{name}/maintenance/exit")
            out = c.maintenance.exit(name, return_vms=form.get("return_vms") == "1")
        except ManagerError as exc:
            return await _host_again(c, caller, name, exc)
        if out.task_id is None:
            return RedirectResponse(f"/ui/hosts/{name}", status_code=303)
        request.scope[TASK_ID] = out.task_id
        return RedirectResponse(f"/ui/tasks/{out.task_id}", status_code=303)

    @app.post("/ui/drs/run", include_in_schema=False)
    async def drs_run(request: Request) -> Response:
        caller, _form = await c.form(request)
        try:
            allowed(caller, "POST", "/v1/drs/run")
            await c.drs.tick()
        except ManagerError as exc:
            ctx = await asyncio.to_thread(pages.drs_context, c)
            return redo(caller, "drs.html", lambda: ctx, exc)
        return RedirectResponse("/ui/drs", status_code=303)

    @app.post("/ui/drs/apply", include_in_schema=False)
    async def drs_apply(request: Request) -> Response:
        caller, form = await c.form(request)
        try:
            allowed(caller, "POST", "/v1/drs/apply")
            everything = form.get("which") == "all"
            req = ApplyRequest(
                all=everything, ids=[] if everything else [int(i) for i in form.getall("ids")]
            )
            task = c.drs.apply(req)  # on the loop: it starts the operation's task
        except (ManagerError, ValidationError, ValueError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):
                exc = Invalid(f"ids: {exc}", field="ids")
            ctx = await asyncio.to_thread(pages.drs_context, c)
            return redo(caller, "drs.html", lambda: ctx, exc)
        request.scope[TASK_ID] = task.id
        return RedirectResponse(f"/ui/tasks/{task.id}", status_code=303)

    async def act(
        request: Request,
        route: tuple[str, str],
        do: Callable[[Form], Awaitable[object]],
        page: tuple[str, Callable[[Console, dict[str, str]], dict[str, Any]]],
        done: str,
    ) -> Response:
        """A form that does what ``route`` does: to ``done`` after it, or the page again
        with the refusal and the form as it was sent."""
        caller, form = await c.form(request)
        try:
            allowed(caller, *route)
            await do(form)
        except (ManagerError, ValidationError) as exc:
            template, context = page
            ctx = await asyncio.to_thread(context, c, form.values())
            return redo(caller, template, lambda: ctx, exc)
        return RedirectResponse(done, status_code=303)

    rules = ("rules.html", pages.rules_context)
    schedules = ("schedules.html", pages.schedules_context)

    @app.post("/ui/rules", include_in_schema=False)
    async def rule_create(request: Request) -> Response:
        async def do(form: Form) -> None:
            req = RuleCreate(
                name=form.get("name"),
                kind=form.get("kind"),
                strength=form.get("strength", "must"),
                vms=_names(form.get("vms")),
                hosts=_names(form.get("hosts")),
            )
            await asyncio.to_thread(c.drs.config.create_rule, req)

        return await act(request, ("POST", "/v1/rules"), do, rules, "/ui/rules")

    @app.post("/ui/rules/{name}/delete", include_in_schema=False)
    async def rule_delete(request: Request, name: Name) -> Response:
        async def do(_form: Form) -> None:
            await asyncio.to_thread(c.drs.config.delete_rule, name)

        return await act(request, ("DELETE", "/v1/rules/{name}"), do, rules, "/ui/rules")

    @app.post("/ui/schedules", include_in_schema=False)
    async def schedule_create(request: Request) -> Response:
        async def do(form: Form) -> None:
            body = {k: form.get(k) for k in ("name", "at", "cron", "action", "vm", "to", "host")}
            req = ScheduleCreate.model_validate({k: v for k, v in body.items() if v})
            await asyncio.to_thread(c.schedules.create, req)

        return await act(request, ("POST", "/v1/schedules"), do, schedules, "/ui/schedules")

    @app.post("/ui/schedules/{schedule_id}/delete", include_in_schema=False)
    async def schedule_delete(request: Request, schedule_id: TaskId) -> Response:
        async def do(_form: Form) -> None:
            await asyncio.to_thread(c.schedules.delete, schedule_id)

        route = ("DELETE", "/v1/schedules/{schedule_id}")
        return await act(request, route, do, schedules, "/ui/schedules")


async def _host_again(c: Console, caller: Caller, name: str, exc: Exception) -> Response:
    context = await asyncio.to_thread(pages.host_context, c, name)
    err = refused(exc)
    if context is None:
        return c.render.page(
            "error.html", caller, {"title": "Not found", **err}, int(err["status"])
        )
    return c.render.page("host.html", caller, {**context, **err}, int(err["status"]))
