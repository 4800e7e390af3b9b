"""The console's pages that only read: sign-in, cluster, VM, host, tasks, DRS, rules, schedules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from qmotion.api.server import TaskOut
from qmotion.api.vm import NAME_PATTERN
from qmotion.server.access import IDENTITY
from qmotion.server.console import chart, session, views
from qmotion.server.console.base import Console, refused
from qmotion.server.console.render import Caller, safe_next
from qmotion.server.errors import ManagerError, NotFound

T = TypeVar("T")
SAMPLE_HEAD = ["t (s)", "pass", "remaining MiB", "throughput MiB/s", "dirty MiB/s"]
Name = Annotated[str, Path(pattern=NAME_PATTERN)]
TaskId = Annotated[int, Path(ge=1, le=2**63 - 1)]
RULE_KINDS = [
    ("anti-affinity", "anti-affinity: these VMs on different hosts"),
    ("affinity", "affinity: these VMs on one host"),
    ("run-on", "run-on: these VMs on these hosts"),
    ("not-run-on", "not-run-on: these VMs never on these hosts"),
]


def install_pages(app: FastAPI, c: Console) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)

    @app.get("/ui/login", include_in_schema=False)
    def login_page(next: Annotated[str, Query(max_length=2048)] = "/ui/") -> HTMLResponse:
        return c.render.page("login.html", None, {"next": safe_next(next), "title": "Sign in"})

    @app.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await session.read_form(request)
        session.check_csrf(request, None, form)
        nxt = safe_next(form.get("next"))
        found = await asyncio.to_thread(c.sessions.sign_in, form.get("token"))
        if found is None:
            return c.render.page(
                "login.html",
                None,
                {
                    "next": nxt,
                    "title": "Sign in",
                    "error": "unknown or revoked token [unauthorized]",
                    "error_title": "Not signed in",
                },
                status=401,
            )
        secret, who = found
        request.scope[IDENTITY] = who  # the audit row names who signed in
        secure = request.url.scheme == "https"
        # A browser signing in again leaves its old session behind: end it.
        c.sessions.sign_out(request.cookies.get(session.cookie_name(secure)))
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(
            session.cookie_name(secure),
            secret,
            max_age=int(session.MAX_AGE_S),
            path="/",
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        return resp

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await c.form(request)
        secure = request.url.scheme == "https"
        c.sessions.sign_out(request.cookies.get(session.cookie_name(secure)))
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(session.cookie_name(secure), path="/", secure=secure, httponly=True)
        return resp

    @app.get("/ui/", include_in_schema=False)
    def cluster(request: Request, q: Annotated[str, Query(max_length=200)] = "") -> HTMLResponse:
        caller = c.caller(request)
        hosts, vms = c.inventory.list_hosts(), c.inventory.list_vms()
        snap = c.drs.snapshot(links=False)  # the bars and the balance read one snapshot
        recs = c.drs.recommendations()
        return c.render.page(
            "cluster.html",
            caller,
            {
                "nav": "cluster",
                "title": "Cluster",
                "hosts": views.host_rows(hosts, snap),
                "vms": vms,
                "shown": views.vm_rows(vms, q),
                "q": q,
                "drs": c.drs.state(snap),
                "pending": sum(1 for r in recs if r.state == "pending"),
            },
        )

    @app.get("/ui/vms/{name}", include_in_schema=False)
    def vm_page(request: Request, name: Name) -> HTMLResponse:
        caller = c.caller(request)
        vm = or_404(c, caller, lambda: c.inventory.show_vm(name))
        if isinstance(vm, HTMLResponse):
            return vm
        tasks = [t for t in c.runner.list(200) if t.vm == name]
        active = next((t for t in tasks if not views.is_final(t)), None)
        return c.render.page(
            "vm.html",
            caller,
            {"vm": vm, "tasks": tasks, "active": active, "title": f"VM {name}", "nav": "cluster"},
        )

    @app.get("/ui/hosts/{name}", include_in_schema=False)
    def host_page(request: Request, name: Name) -> HTMLResponse:
        caller = c.caller(request)
        ctx = host_context(c, name)
        if ctx is None:
            return _not_found(c, caller, f"no host named {name}")
        return c.render.page("host.html", caller, ctx)

    @app.get("/ui/tasks", include_in_schema=False)
    def tasks_page(request: Request) -> HTMLResponse:
        caller = c.caller(request)
        return c.render.page(
            "tasks.html", caller, {"tasks": c.runner.list(200), "title": "Tasks", "nav": "tasks"}
        )

    @app.get("/ui/tasks/{task_id}", include_in_schema=False)
    def task_page(request: Request, task_id: TaskId) -> HTMLResponse:
        caller = c.caller(request)
        task = or_404(c, caller, lambda: c.runner.get(task_id))
        if isinstance(task, HTMLResponse):
            return task
        return c.render.page("task.html", caller, task_context(task))

    @app.get("/ui/drs", include_in_schema=False)
    def drs_page(request: Request) -> HTMLResponse:
        caller = c.caller(request)
        return c.render.page("drs.html", caller, drs_context(c))

    @app.get("/ui/rules", include_in_schema=False)
    def rules_page(request: Request) -> HTMLResponse:
        caller = c.caller(request)
        return c.render.page("rules.html", caller, rules_context(c, {}))

    @app.get("/ui/schedules", include_in_schema=False)
    def schedules_page(request: Request) -> HTMLResponse:
        caller = c.caller(request)
        return c.render.page("schedules.html", caller, schedules_context(c, {}))


def task_context(task: TaskOut) -> dict[str, object]:
    """The task page's (and its stream's) figures; the report and chart once it ended."""
    final = views.is_final(task)
    ctx: dict[str, object] = {
        "task": task,
        "final": final,
        "figures": views.progress_figures(task),
        "title": f"Task {task.id}",
        "nav": "tasks",
        "report": task.result,
        "report_rows": [],
        "chart": "",
        "samples": [],
        "sample_head": [],
    }
    r = task.result
    if final and r is not None:
        ctx["report_rows"] = views.report_rows(r)
        ctx["chart"] = chart.flight_chart(r)
        ctx["samples"] = chart.sample_rows(r)
        ctx["sample_head"] = SAMPLE_HEAD
    return ctx


def host_context(c: Console, name: str) -> dict[str, object] | None:
    """The host page's facts, bars and maintenance state; None: no such host."""
    host = next((h for h in c.inventory.list_hosts() if h.name == name), None)
    if host is None:
        return None
    return {
        "host": host,
        "row": views.host_rows([host], c.drs.snapshot(links=False))[0],
        "maint": c.maintenance.status(name),
        "title": f"Host {name}",
        "nav": "cluster",
    }


def drs_context(c: Console) -> dict[str, object]:
    return {
        "state": c.drs.state(),
        "settings": c.drs.config.settings(),
        "recs": c.drs.recommendations(),
        "title": "DRS",
        "nav": "drs",
    }


def rules_context(c: Console, form: dict[str, str]) -> dict[str, object]:
    return {
        "rules": c.drs.config.list_rules(),
        "kinds": RULE_KINDS,
        "form": views.Choices(form),
        "field": None,
        "title": "Rules",
        "nav": "rules",
    }


def schedules_context(c: Console, form: dict[str, str]) -> dict[str, object]:
    return {
        "schedules": c.schedules.list(),
        "actions": ["migrate", "drs", "maintenance_enter", "maintenance_exit"],
        "form": views.Choices(form),
        "field": None,
        "title": "Schedules",
        "nav": "schedules",
    }


def _not_found(c: Console, caller: Caller, message: str) -> HTMLResponse:
    return c.render.page(
        "error.html",
        caller,
        {"title": "Not found", "error": message, "error_title": "Not found"},
        status=404,
    )


def or_404(c: Console, caller: Caller, read: Callable[[], T]) -> T | HTMLResponse:
    try:
        return read()
    except NotFound as exc:
        return _not_found(c, caller, exc.message)
    except ManagerError as exc:
        ctx = refused(exc)
        return c.render.page("error.html", caller, {"title": "Error", **ctx}, ctx["status"])
