"""The Migrate VM wizard: type, target (every host ranked, refusals shown), options, review."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from qmotion.api.schedule import ScheduleAction, ScheduleCreate
from qmotion.api.server import MigrateRequest, VmOut
from qmotion.api.sizes import format_size
from qmotion.server.access import TASK_ID
from qmotion.server.automation.targets import migration_targets
from qmotion.server.console import views
from qmotion.server.console.base import Console, allowed, refused
from qmotion.server.console.pages import Name
from qmotion.server.console.render import Caller
from qmotion.server.errors import Conflict, Invalid, ManagerError

MIGRATE = ("POST", "/v1/vms/{name}/migrate")
# Sessions (by their CSRF token) with a dry run under way: one each.
_predicting: set[str] = set()
STEPS = [("type", "Type"), ("target", "Target"), ("options", "Options"), ("review", "Review")]
KEYS = (
    "kind",
    "to",
    "datastore",
    "disk_format",
    "max_downtime_ms",
    "bandwidth",
    "timeout_s",
    "allow_postcopy",
    "priority",
    "when",
    "at",
    "cron",
)
KINDS = ("host", "datastore", "both", "cold")
LIVE_KNOBS = ("max_downtime_ms", "bandwidth", "timeout_s", "allow_postcopy")


def choices_of(values: dict[str, str]) -> views.Choices:
    """The wizard's choices so far, from a query string or the finished form (nothing else
    is carried from step to step)."""
    return views.Choices({k: values[k][:256] for k in KEYS if values.get(k)})


def request_of(ch: dict[str, str]) -> MigrateRequest:
    """The API request the choices stand for (pydantic's refusals name the field)."""
    kind = ch.get("kind", "host")
    if kind not in KINDS:
        raise Invalid(f"kind: {kind!r} is not one of {', '.join(KINDS)}", field="kind")
    body: dict[str, Any] = {}
    if kind != "datastore":
        if not ch.get("to"):
            raise Invalid("choose the target host", field="to")
        body["to"] = ch["to"]
    if kind in ("datastore", "both") or (kind == "cold" and ch.get("datastore")):
        if not ch.get("datastore"):
            raise Invalid("choose the datastore", field="datastore")
        body["datastore"] = ch["datastore"]
        if ch.get("disk_format"):
            body["disk_format"] = ch["disk_format"]
    if ch.get("priority"):
        body["priority"] = ch["priority"]
    if kind in ("host", "both"):
        for key in ("max_downtime_ms", "timeout_s", "bandwidth"):
            if ch.get(key):
                body[key] = ch[key]
        body["allow_postcopy"] = ch.get("allow_postcopy") == "1"
    return MigrateRequest.model_validate(body)


def plan_lines(vm: VmOut, ch: dict[str, str], req: MigrateRequest) -> list[str]:
    kind = ch.get("kind", "host")
    lines = {
        "host": f"{vm.name} keeps running while its memory, CPU and device state move from "
        f"{vm.host} to {req.to}; its disks stay where they are (shared storage). Its MAC "
        "address and open connections move with it.",
        "datastore": f"{vm.name} keeps running on {vm.host} while its disks are copied to "
        f"datastore {req.datastore}; then it switches to the copies and the old files go.",
        "both": f"{vm.name} keeps running while its disks are copied to datastore "
        f"{req.datastore} on {req.to} and then its memory and state follow (shared-nothing).",
        "cold": f"{vm.name} is {vm.state}: "
        + (
            f"its disks are copied to datastore {req.datastore} on {req.to} and verified, "
            "then its definition moves."
            if req.datastore
            else f"its definition moves to {req.to} (its datastores are shared)."
        ),
    }
    out = [lines[kind]]
    if req.max_downtime_ms:
        out.append(f"The pause at switchover is kept under {req.max_downtime_ms} ms if it can be.")
    if req.bandwidth:
        out.append(f"The migration stream is capped at {req.bandwidth}.")
    if req.allow_postcopy:
        out.append("If pre-copy cannot converge, it switches to postcopy.")
    if req.disk_format:
        out.append(f"New disks are {req.disk_format}.")
    if req.priority == "high":
        out.append("High priority: it goes before the normal moves waiting for these hosts.")
    when = ch.get("when", "now")
    if when == "at":
        out.append(f"It runs once at {ch.get('at', '?')} UTC (a schedule).")
    elif when == "cron":
        out.append(f"It runs on the schedule '{ch.get('cron', '?')}' (UTC).")
    else:
        out.append("It starts when you press Finish; every check runs again then.")
    return out


def kinds_for(vm: VmOut, active: int | None) -> list[tuple[str, str, str, bool, str]]:
    running = vm.state == "running"
    busy = f"it is migrating (task {active})" if active else None
    not_running = f"it is {vm.state}; only a running VM moves live"
    return [
        (
            "host",
            "Change host",
            "Memory and state move to another host; the disks stay on shared storage.",
            running and not busy,
            busy or not_running,
        ),
        (
            "datastore",
            "Change datastore (Storage vMotion)",
            "The disks move to another datastore; the VM stays on its host and keeps running.",
            running and not busy,
            busy or not_running,
        ),
        (
            "both",
            "Change both (shared-nothing)",
            "Disks and memory move to another host and its datastore, while it runs.",
            running and not busy,
            busy or not_running,
        ),
        (
            "cold",
            "Move while stopped",
            "A stopped or suspended VM: its definition moves, its disks are copied if you pick "
            "a datastore.",
            vm.state in ("stopped", "suspended") and not busy,
            busy or f"it is {vm.state}; a running VM moves live",
        ),
    ]


def schedule_of(vm: str, ch: dict[str, str]) -> ScheduleCreate:
    when = ch.get("when")
    at: str | datetime | None = ch.get("at") if when == "at" else None
    if isinstance(at, str):
        try:
            parsed = datetime.fromisoformat(at)
        except ValueError as exc:
            raise Invalid(f"at: {exc}", field="at") from exc
        # The browser's datetime-local has no offset; the form says UTC.
        at = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return ScheduleCreate.model_validate(
        {
            "action": ScheduleAction.MIGRATE,
            "vm": vm,
            "to": ch.get("to"),
            "at": at,
            "cron": ch.get("cron") if when == "cron" else None,
        }
    )


def install_wizard(app: FastAPI, c: Console) -> None:
    @app.get("/ui/vms/{name}/migrate", include_in_schema=False)
    async def wizard(request: Request, name: Name) -> Response:
        caller = await asyncio.to_thread(c.caller, request)
        ch = choices_of(dict(request.query_params))
        step = request.query_params.get("step", "type")
        return await _step(c, caller, name, step, ch, {})

    @app.post("/ui/vms/{name}/migrate/predict", include_in_schema=False)
    async def predict(request: Request, name: Name) -> Response:
        """The dry run: it measures the guest and the path on the hosts, so it is a POST
        (CSRF-checked, audited) and one at a time per session."""
        caller, form = await c.form(request)
        ch = choices_of(form.values())
        try:
            allowed(caller, "POST", "/v1/vms/{name}/migrate/plan")
        except ManagerError as exc:
            return await _step(c, caller, name, "review", ch, refused(exc))
        if caller.csrf in _predicting:
            busy = Conflict("a prediction of yours is running already", vm=name)
            return await _step(c, caller, name, "review", ch, refused(busy))
        _predicting.add(caller.csrf)
        try:
            return await _step(c, caller, name, "review", ch, {"predict": True})
        finally:
            _predicting.discard(caller.csrf)

    @app.post("/ui/vms/{name}/migrate", include_in_schema=False)
    async def finish(request: Request, name: Name) -> Response:
        caller, form = await c.form(request)
        ch = choices_of(form.values())
        try:
            allowed(caller, *MIGRATE)
            req = request_of(ch)
            # The VM may have stopped or started since step 1: the API would then make it
            # another kind of move than the one reviewed.
            vm = await asyncio.to_thread(c.inventory.show_vm, name)
            kind = next(k for k in kinds_for(vm, None) if k[0] == ch.get("kind", "host"))
            if not kind[3]:
                raise Conflict(f"{kind[1]} is not possible now: {kind[4]}", vm=name, field="kind")
            if ch.get("when") in ("at", "cron"):
                allowed(caller, "POST", "/v1/schedules")
                if ch.get("kind") != "host":
                    raise Invalid("only a move to another host can be scheduled", field="when")
                knobs = [k for k in LIVE_KNOBS if ch.get(k)]
                if ch.get("priority") == "high":
                    knobs.append("priority")
                if knobs:
                    raise Invalid(
                        f"a schedule moves the VM with the default options: clear "
                        f"{', '.join(knobs)} or run it now",
                        field="when",
                    )
                sched = schedule_of(name, ch)
                await asyncio.to_thread(c.schedules.create, sched)
                return RedirectResponse("/ui/schedules", status_code=303)
            task = await c.actions.submit_migration(name, req)
        except (ManagerError, ValidationError) as exc:
            return await _step(c, caller, name, "review", ch, refused(exc))
        request.scope[TASK_ID] = task.id
        return RedirectResponse(f"/ui/tasks/{task.id}", status_code=303)


async def _step(
    c: Console, caller: Caller, name: str, step: str, ch: dict[str, str], extra: dict[str, Any]
) -> Response:
    def read() -> tuple[VmOut, int | None]:
        # Asked of its host at the first step; later steps read the inventory.
        vm = c.inventory.show_vm(name, refresh=step == "type")
        active = next(
            (t.id for t in c.runner.list(200) if t.vm == name and not views.is_final(t)), None
        )
        return vm, active

    try:
        vm, active = await asyncio.to_thread(read)
    except ManagerError as exc:
        err = refused(exc)
        return c.render.page("error.html", caller, {"title": "Migrate", **err}, err["status"])
    names = [s for s, _ in STEPS]
    if step not in names:
        step = "type"
    ctx: dict[str, Any] = {
        "vm": vm,
        "step": step,
        "steps": STEPS,
        "step_index": names.index(step),
        "choices": ch,
        "title": f"Migrate {name}",
        "nav": "cluster",
        "current_datastores": views.vm_datastores(vm),
        "kinds": kinds_for(vm, active),
        "back": _url(name, names[max(0, names.index(step) - 1)], ch),
    }
    ctx.update(extra)
    if not caller.can(*MIGRATE):
        ctx.update({"step": "type", "kinds": []})
        ctx.setdefault("error", f"{caller.who.user} is {caller.who.role.value}: may not migrate")
        return c.render.page("migrate.html", caller, ctx, 403)
    try:
        if step == "target":
            ctx.update(await asyncio.to_thread(_targets, c, vm, ch))
        elif step in ("options", "review"):
            req = request_of(ch)
            ctx["live"] = ch.get("kind") in ("host", "both")
            ctx["schedulable"] = ch.get("kind") == "host"
            if step == "review":
                ctx["plan"] = plan_lines(vm, ch, req)
                if extra.get("predict"):
                    ctx.update(await _prediction(c, caller, name, ch, req))
                else:
                    ctx.update(prediction=None, prediction_note=_not_predicted(ch))
    except (ManagerError, ValidationError) as exc:
        # A choice the API refuses: back one step, the choices kept, the reason shown.
        err = refused(exc)
        back = "target" if step in ("options", "review") else "type"
        if step == "target":
            return c.render.page("migrate.html", caller, {**ctx, "step": "type", **err}, 200)
        return await _step(c, caller, name, back, ch, err)
    return c.render.page("migrate.html", caller, ctx, int(extra.get("status", 200)))


def _targets(c: Console, vm: VmOut, ch: dict[str, str]) -> dict[str, Any]:
    kind = ch.get("kind", "host")
    hosts = c.inventory.list_hosts()
    all_ds = sorted({d.name for h in hosts if h.facts is not None for d in h.facts.datastores})
    if kind == "datastore":
        here = next((h for h in hosts if h.name == vm.host), None)
        rows = []
        for d in here.facts.datastores if here and here.facts else []:
            reasons = [r.message for r in c.runner.refusals(vm.name, None, d.name)]
            rows.append({"name": d.name, "shared": d.shared, "ok": not reasons, "reasons": reasons})
        first = next((r["name"] for r in rows if r["ok"]), None)
        for r in rows:
            r["first"] = r["name"] == first
        return {"datastore_targets": rows, "any_ok": first is not None, "all_datastores": all_ds}
    if kind == "both" and not ch.get("datastore"):
        current = set(views.vm_datastores(vm))
        ch["datastore"] = next((d for d in all_ds if d not in current), all_ds[0] if all_ds else "")
    targets = migration_targets(c.drs, c.runner, vm.name, ch.get("datastore") or None)
    first_ok = next((t.host for t in targets if t.feasible), None)
    return {
        "targets": targets,
        "first_ok": first_ok,
        "any_ok": first_ok is not None,
        "all_datastores": all_ds,
    }


async def _prediction(
    c: Console, caller: Caller, name: str, ch: dict[str, str], req: MigrateRequest
) -> dict[str, Any]:
    """The dry run for a move to another host (measured: the guest's dirty rate and the
    path); other moves are not predicted, and a failed prediction does not stop the move."""
    if ch.get("kind") != "host":
        return {"prediction": None, "prediction_note": _not_predicted(ch)}
    try:
        p = await asyncio.wait_for(c.runner.predict_migration(name, req), 60)
    except (ManagerError, TimeoutError) as exc:
        why = exc.message if isinstance(exc, ManagerError) else "it took over 60 s"
        return {"prediction": None, "prediction_note": f"No prediction: {why}."}
    extra = [
        ("Memory", format_size(p.memory_bytes)),
        ("Guest dirties", f"{p.dirty_rate_bps / views.MIB:.1f} MiB/s"),
        (
            "Path",
            f"{p.bandwidth_bps / views.MIB:.0f} MiB/s ({p.bandwidth_from}), "
            f"{p.rtt_ms:.1f} ms round trip",
        ),
    ]
    if p.measures:
        extra.append(("Ladder rungs needed", ", ".join(p.measures)))
    if p.unreachable:
        extra.append(("Unreachable addresses", ", ".join(p.unreachable)))
    return {"prediction": p, "prediction_extra": extra, "prediction_note": ""}


def _not_predicted(ch: dict[str, str]) -> str:
    if ch.get("kind") != "host":
        return (
            "Not predicted: only a move of the memory to another host is (disk copies run "
            "at the datastores' speed)."
        )
    return "Press Predict for a dry run: it measures the guest and the path, starts nothing."


def _url(name: str, step: str, ch: dict[str, str]) -> str:
    return f"/ui/vms/{name}/migrate?" + urlencode({"step": step, **ch})
