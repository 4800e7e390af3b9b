"""The scripted agent's API: the manager's requests, routed and answered as the agent does."""

from __future__ import annotations

import json
import re
import time

import httpx

from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import (
    DirtyRateRequest,
    IncomingRequest,
    MigrationTune,
    OutgoingRequest,
    PathProbeRequest,
)
from qmotion.api.vm import VmSpec
from tests.unit.agent_world import migrations, nbd
from tests.unit.agent_world.cluster import Cluster, FakeVm
from tests.unit.agent_world.qemu import GUEST_BYTES
from tests.unit.agent_world.wire import _error, _json


def answer(world: Cluster, host: str, req: httpx.Request) -> httpx.Response:
    path, method = req.url.path, req.method
    here = world.vms[host]
    if path == "/v1/migrations/incoming" and method == "POST":
        return migrations.incoming(
            world, host, IncomingRequest.model_validate(json.loads(req.content))
        )
    if path == "/v1/migrations/incoming/check" and method == "POST":
        incoming = IncomingRequest.model_validate(json.loads(req.content))
        if incoming.spec.name in here:
            return _error(
                409, AgentErrorCode.CONFLICT, f"a VM named {incoming.spec.name!r} is defined"
            )
        return httpx.Response(204)
    if path == "/v1/host" and method == "GET":
        return _json(world.host_facts(host))
    if path == "/v1/metrics" and method == "GET":
        return _json(world._metrics(host))
    if path == "/v1/vms" and method == "GET":
        return _json([world._info(host, v).model_dump(mode="json") for v in here.values()])
    if path == "/v1/vms" and method == "POST":
        spec = VmSpec.model_validate(json.loads(req.content))
        if spec.name in here:
            return _error(409, AgentErrorCode.CONFLICT, f"a VM named {spec.name!r} is defined")
        here[spec.name] = FakeVm(spec=spec, runstate="gone")
        return _json(world._info(host, here[spec.name]).model_dump(mode="json"), 201)
    if path == "/v1/net/probe" and method == "POST":
        return migrations.probe(world, PathProbeRequest.model_validate(json.loads(req.content)))
    m = re.fullmatch(r"/v1/vms/([a-z0-9-]+)(/.*)?", path)
    if m is None:
        return _error(404, "not_found", f"no route {path}")
    name, rest = m.group(1), m.group(2) or ""
    vm = here.get(name)
    # Like the agent, these ask for the VM's monitor (409 without a QEMU) or its outgoing
    # migration (409 without one) before anything else.
    if method == "POST" and rest == "/dirty-rate":
        return migrations.dirty_rate(
            world, name, vm, DirtyRateRequest.model_validate(json.loads(req.content))
        )
    if method == "PATCH" and rest == "/migration":
        return migrations.tune(
            world, host, name, vm, MigrationTune.model_validate(json.loads(req.content))
        )
    if vm is None:
        return _error(
            404, AgentErrorCode.VM_NOT_FOUND, f"no VM named {name!r} on this host", vm=name
        )
    if method == "GET" and rest == "":
        return _json(world._info(host, vm).model_dump(mode="json"))
    if method == "DELETE" and rest == "":
        del here[name]
        world.files[host] -= set(vm.owned)  # an unfinished copy's disks go with it
        return httpx.Response(204)
    if rest == "/export":
        # qmotion.agent.disks.transfer: hold a stopped VM; serving disks is not modelled here.
        if method == "DELETE":
            # release=false ends the exports only; the hold stays (transfer.unexport).
            if req.url.params.get("release", "true") == "true":
                vm.held = False
            return httpx.Response(204)
        if vm.runstate != "gone":
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is running", vm=name)
        if vm.spec.disks and req.url.params.get("copy", "true") == "true":
            return _error(501, "not_modelled", "the world serves no disk exports", vm=name)
        vm.held = True
        return _json([])
    if rest.startswith("/migration/mirror") or rest in ("/disks", "/migration/keep-disks"):
        return nbd.disk_route(world, host, name, vm, method, rest, req)
    if method == "POST" and rest == "/migration":
        out = OutgoingRequest.model_validate(json.loads(req.content))
        return migrations.outgoing(world, host, name, vm, out)
    if method == "GET" and rest == "/migration":
        if vm.precopy is not None:
            world._wait(vm, req)
        if vm.migration == "active" and vm.precopy is None:
            vm.polls += 1
            vm.transferred = min(GUEST_BYTES, vm.transferred + GUEST_BYTES // 4)
            long_enough = time.monotonic() - vm.started >= world.duration_s
            if vm.polls >= world.polls_to_complete and long_enough:
                world.complete(name)
        elif vm.migration == "cancelling":
            world._settle_cancel(name, vm)
        return _json(world._stats(vm))
    if method == "POST" and rest == "/migration/cancel":
        if vm.migration == "active":
            vm.migration = "cancelling"
        return _json(world._stats(vm))
    if method == "POST" and rest == "/resume":
        after_failed = req.url.params.get("after_failed_switchover") == "true"
        if vm.migration == "completed" and not after_failed:
            return _error(
                409, AgentErrorCode.MIGRATED_AWAY, f"VM {name} completed its migration away"
            )
        if vm.migration not in ("none", "completed", "failed", "cancelled"):
            return _error(
                409, AgentErrorCode.CONFLICT, f"VM {name} is still migrating ({vm.migration})"
            )
        if vm.runstate in ("paused", "postmigrate"):
            vm.runstate = "running"
        vm.mirror = None  # it runs on its own disks: any copy is void
        return _json({"qemu_status": vm.runstate})
    if method == "POST" and rest == "/release":
        if vm.runstate != "postmigrate":
            return _error(
                409, AgentErrorCode.CONFLICT, f"VM {name} is {vm.runstate} here, not migrated"
            )
        if vm.mirror == "completed":
            # The copies run elsewhere now: the old files go.
            world.files[host] -= {f"{d.datastore}:{d.path}" for d in vm.spec.disks}
        del here[name]
        return httpx.Response(204)
    if method == "POST" and rest == "/announce":
        return httpx.Response(204)
    return _error(404, "not_found", f"no route {method} {path}")
