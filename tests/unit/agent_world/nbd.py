"""The scripted agent's disk routes: the source's disk mirror and the destination's disks."""

from __future__ import annotations

import json
from typing import Any

import httpx

from qmotion.api.errors import AgentErrorCode
from qmotion.api.storage import DiskMirror, DiskUsage, MirrorStatus, NbdMirrorRequest
from tests.unit.agent_world.cluster import Cluster, FakeVm
from tests.unit.agent_world.storage_moves import unresolved
from tests.unit.agent_world.wire import _error, _json


def disk_route(
    world: Cluster, host: str, name: str, vm: FakeVm, method: str, rest: str, req: httpx.Request
) -> httpx.Response:
    """qmotion.agent.disks.nbd as the agent serves it: the source's mirror, the destination's
    disks. A mirror is in sync (write-blocking, actively synced) at its second poll; one
    whose destination is gone fails."""
    if method == "GET" and rest == "/disks":
        usage = [
            DiskUsage(
                index=i,
                datastore=d.datastore,
                path=d.path,
                format=d.format,
                virtual_size=64 << 20,
                allocated_bytes=8 << 20,
            )
            for i, d in enumerate(vm.spec.disks)
        ]
        return _json([u.model_dump(mode="json") for u in usage])
    if method == "POST" and rest == "/migration/mirror":
        NbdMirrorRequest.model_validate(json.loads(req.content))
        if (reason := unresolved(vm)) is not None:
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} cannot copy now: {reason}")
        if vm.mirror in ("mirroring", "ready"):
            return _json(mirror_status(name, vm))
        if vm.runstate not in ("running", "paused"):
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is not running")
        vm.mirror, vm.mirror_polls = "mirroring", 0
        return _json(mirror_status(name, vm))
    if method == "GET" and rest == "/migration/mirror":
        if vm.mirror is None:
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} has no disk mirror")
        vm.mirror_polls += 1
        destination_gone = not any(
            (d := world.vms[h].get(name)) is not None and d.runstate == "inmigrate"
            for h in world.hosts
            if h != host
        )
        if vm.mirror in ("mirroring", "ready") and destination_gone:
            vm.mirror = "failed"
        elif vm.mirror == "mirroring" and vm.mirror_polls >= 2:
            vm.mirror = "ready"
        return _json(mirror_status(name, vm))
    if method == "POST" and rest == "/migration/mirror/abort":
        vm.mirror = None
        return _json(MirrorStatus(vm=name, phase="aborted", datastore="").model_dump())
    return _error(404, "not_found", f"no route {method} {rest}")


def mirror_status(name: str, vm: FakeVm) -> dict[str, Any]:
    ready = vm.mirror in ("ready", "completed")
    phase = vm.mirror if vm.mirror in ("mirroring", "ready", "failed") else "completed"
    st = MirrorStatus(
        vm=name,
        phase=phase,
        datastore="local-h2",
        copy_mode="write-blocking" if ready else "background",
        disks=[
            DiskMirror(
                index=i,
                job=f"qm-nbd-{i}",
                source=d,
                target=d,
                status="ready" if ready else "running",
                offset=64 << 20 if ready else 16 << 20,
                length=64 << 20,
                ready=ready,
                actively_synced=ready,
            )
            for i, d in enumerate(vm.spec.disks)
        ],
        total_bytes=(64 << 20) * len(vm.spec.disks),
        remaining_bytes=0 if ready else (48 << 20) * len(vm.spec.disks),
        rate_bps=1e6,
        error="the destination went away" if vm.mirror == "failed" else None,
    )
    return st.model_dump(mode="json")
