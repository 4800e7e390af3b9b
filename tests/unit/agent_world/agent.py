"""The scripted agent's API: the manager's requests, routed and answered as the agent does."""

from __future__ import annotations

import json
import re

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
from tests.unit.agent_world import ids, migrations, nbd, storage_moves
from tests.unit.agent_world.cluster import Cluster, FakeVm
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
        return ids.delete(world, host, name, vm, req)
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
    if method == "POST" and rest == "/migration/keep-disks":
        return ids.keep_disks(vm, name, req)
    if method == "POST" and rest == "/migration/finish":
        return ids.finish(world, host, name, vm, req)
    if method == "POST" and rest == "/migration/recover-incoming":
        return ids.recover_incoming(vm, name, req)
    if method == "POST" and rest == "/migration/resume":
        return ids.reconnect(world, vm, name)
    if rest.startswith("/migration/mirror") or rest == "/disks":
        return nbd.disk_route(world, host, name, vm, method, rest, req)
    if rest.startswith("/storage-move"):
        return storage_moves.route(world, host, name, vm, method, rest, req)
    if method == "POST" and rest == "/migration":
        out = OutgoingRequest.model_validate(json.loads(req.content))
        return migrations.outgoing(world, host, name, vm, out)
    if method == "GET" and rest == "/migration":
        return ids.stats(world, name, vm, req)
    if method == "POST" and rest == "/migration/cancel":
        return ids.cancel(world, vm, req)
    if method == "POST" and rest == "/resume":
        return ids.resume(vm, name, req)
    if method == "POST" and rest == "/release":
        return ids.release(world, host, name, vm, req)
    if method == "POST" and rest == "/announce":
        return httpx.Response(204)
    if method == "POST" and rest == "/stop":
        # qmotion.agent.vms.manager.stop: QEMU ends (a postmigrate copy too).
        vm.runstate = "gone"
        return _json(world._info(host, vm).model_dump(mode="json"))
    if method == "POST" and rest == "/start":
        if vm.runstate != "gone":
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is already running", vm=name)
        if vm.held:
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is held", vm=name)
        vm.runstate = "running"
        return _json(world._info(host, vm).model_dump(mode="json"))
    return _error(404, "not_found", f"no route {method} {path}")
