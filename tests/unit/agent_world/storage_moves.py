"""The scripted agent's storage moves (Storage vMotion on one host), as qmotion.agent's
``disks.storage`` answers them: mirror a running VM's disks to another datastore, pivot all of
them or none, remove the old files only after the pivot.

As the agent: the move's record (``FakeVm.storage_move``, its storage-move.json) is written
before any file exists and survives an agent restart; a pivot whose answer was lost is found
settled by the next call (``switching``: QEMU's answer decides); a file QEMU runs on (the
definition's disks of a VM with a QEMU) is never deleted; while a move is unresolved the VM is
not live-migrated (``unresolved``, the agent's storage guard). Every job is in sync at the
second status query (as the world's shared-nothing mirror).
"""

from __future__ import annotations

import json

import httpx

from qmotion.api.errors import AgentErrorCode
from qmotion.api.storage import DiskMirror, MirrorRequest, MirrorStatus
from qmotion.api.vm import Disk
from tests.unit.agent_world.cluster import Cluster, FakeVm, MoveRecord
from tests.unit.agent_world.wire import _error, _json

SIZE = 64 << 20


def unresolved(vm: FakeVm) -> str | None:
    """Why the VM must not be migrated now (agent.disks.storage_record.unresolved)."""
    rec = vm.storage_move
    if rec is None or rec.phase in ("released", "aborted"):
        return None
    return f"its storage move to {rec.datastore} is {rec.phase}"


def route(
    world: Cluster, host: str, name: str, vm: FakeVm, method: str, rest: str, req: httpx.Request
) -> httpx.Response:
    """``/v1/vms/NAME/storage-move[/STEP]``."""
    step = rest.removeprefix("/storage-move").lstrip("/")
    if method == "POST" and step in ("", "check"):
        mreq = MirrorRequest.model_validate(json.loads(req.content))
        refused = _check(world, host, name, vm, mreq)
        if refused is not None:
            return refused
        if step == "check":
            return _json(_aborted(name, mreq.datastore))
        return _start(world, host, name, vm, mreq)
    if method == "GET" and step == "":
        rec = vm.storage_move
        if rec is None:
            return _error(409, AgentErrorCode.CONFLICT, f"VM {name} has no storage move", name)
        _settle(vm, rec)
        return _status(name, vm, rec, poll=True)
    if method != "POST":
        return _error(404, "not_found", f"no route {method} {rest}")
    if step == "activate":
        rec, refused = _require(name, vm, ("mirroring", "ready"))
        if rec is None:
            return refused
        rec.copy_mode = "write-blocking"
        return _status(name, vm, rec)
    if step == "pivot":
        return _pivot(name, vm)
    if step == "release":
        return _release(world, host, name, vm)
    if step == "abort":
        return _abort(world, host, name, vm)
    return _error(404, "not_found", f"no route {method} {rest}")


def _check(
    world: Cluster, host: str, name: str, vm: FakeVm, mreq: MirrorRequest
) -> httpx.Response | None:
    """What ``start`` refuses (an earlier failed move's leftovers are cleared first)."""
    if vm.runstate == "gone":  # the agent asks for the VM's monitor first
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is not running", vm=name)
    if vm.storage_move is not None and vm.storage_move.phase == "failed":
        _remove_targets(world, host, vm, vm.storage_move)
        vm.storage_move = None
    if (reason := unresolved(vm)) is not None:
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name}: {reason}", vm=name)
    known = {d["name"] for d in world.host_facts(host).get("datastores", ())}
    if mreq.datastore not in known:
        return _error(
            422, AgentErrorCode.SPEC_REJECTED, f"no datastore {mreq.datastore} here", vm=name
        )
    if not vm.spec.disks:
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} has no disks to move", vm=name)
    if all(d.datastore == mreq.datastore for d in vm.spec.disks):
        return _error(
            409, AgentErrorCode.CONFLICT, f"every disk of {name} is on {mreq.datastore}", vm=name
        )
    return None


def _start(world: Cluster, host: str, name: str, vm: FakeVm, mreq: MirrorRequest) -> httpx.Response:
    moving = {i: d for i, d in enumerate(vm.spec.disks) if d.datastore != mreq.datastore}
    targets: dict[int, Disk] = {}
    for i, d in moving.items():
        fmt = mreq.format or d.format
        gen = 1
        # A fresh name (agent.disks.datastores.free_name): never an existing file.
        while f"{mreq.datastore}:{name}/disk{i}-m{gen}.{fmt}" in world.files[host]:
            gen += 1
        path = f"{name}/disk{i}-m{gen}.{fmt}"
        targets[i] = Disk(datastore=mreq.datastore, path=path, format=fmt, bootable=d.bootable)
    rec = MoveRecord(datastore=mreq.datastore, phase="mirroring", targets=targets, sources=moving)
    vm.storage_move = rec  # recorded before any file exists
    world.files[host] |= {_file(d) for d in targets.values()}
    return _status(name, vm, rec)


def _require(
    name: str, vm: FakeVm, phases: tuple[str, ...]
) -> tuple[MoveRecord | None, httpx.Response]:
    rec = vm.storage_move
    if rec is None:
        return None, _error(409, AgentErrorCode.CONFLICT, f"VM {name} has no storage move", name)
    if rec.phase not in phases:
        why = f"the storage move of {name} is {rec.phase}"
        return None, _error(409, AgentErrorCode.CONFLICT, why, vm=name)
    return rec, httpx.Response(204)


def _pivot(name: str, vm: FakeVm) -> httpx.Response:
    rec, refused = _require(name, vm, ("mirroring", "ready", "switching"))
    if rec is None:
        return refused
    if rec.phase == "switching":  # an earlier pivot's answer was lost
        _settle(vm, rec)
        return _status(name, vm, rec)
    if rec.phase != "ready":
        return _error(
            409, AgentErrorCode.CONFLICT, f"the disks of {name} are not in sync yet", vm=name
        )
    rec.phase = "switching"  # recorded before the first finalize
    _switch(vm, rec)
    return _status(name, vm, rec)


def _switch(vm: FakeVm, rec: MoveRecord) -> None:
    """QEMU runs on the targets; the definition names them (Pivots._adopt)."""
    disks = list(vm.spec.disks)
    for i, target in rec.targets.items():
        disks[i] = target
    vm.spec = vm.spec.model_copy(update={"disks": disks})
    rec.phase = "pivoted"


def _settle(vm: FakeVm, rec: MoveRecord) -> None:
    """A ``switching`` record made true: QEMU's block nodes say which disks switched."""
    if rec.phase != "switching":
        return
    if all(vm.spec.disks[i] == t for i, t in rec.targets.items()):
        rec.phase = "pivoted"
    elif vm.runstate == "gone":
        rec.error = "whether the disks switched is unknown (QEMU is gone); both copies kept"
    else:
        rec.phase, rec.error = "failed", "the pivot was interrupted; nothing switched"


def _in_use(vm: FakeVm) -> set[str]:
    """The files QEMU has open: the disks it runs on (none without a QEMU)."""
    return set() if vm.runstate == "gone" else {_file(d) for d in vm.spec.disks}


def _release(world: Cluster, host: str, name: str, vm: FakeVm) -> httpx.Response:
    rec = vm.storage_move
    if rec is None:  # released before; its answer was lost
        return _json(MirrorStatus(vm=name, phase="released", datastore="").model_dump())
    _settle(vm, rec)
    if rec.phase not in ("pivoted", "released"):
        why = f"the storage move of {name} is {rec.phase}"
        return _error(409, AgentErrorCode.CONFLICT, why, vm=name)
    old = {_file(d) for d in rec.sources.values()} - _in_use(vm)
    world.files[host] -= old
    rec.phase = "released"
    body = _status(name, vm, rec)
    vm.storage_move = None
    return body


def _abort(world: Cluster, host: str, name: str, vm: FakeVm) -> httpx.Response:
    rec = vm.storage_move
    if rec is None:
        return _json(_aborted(name, ""))
    _settle(vm, rec)
    if rec.phase == "switching":
        why = f"whether the disks of {name} switched is unknown: both copies kept"
        return _error(409, AgentErrorCode.CONFLICT, why, vm=name)
    if rec.phase in ("pivoted", "released"):
        why = f"the disks of {name} were already switched to {rec.datastore}"
        return _error(409, AgentErrorCode.ALREADY_SWITCHED, why, vm=name)
    _remove_targets(world, host, vm, rec)
    vm.storage_move = None
    return _json(_aborted(name, rec.datastore))


def _remove_targets(world: Cluster, host: str, vm: FakeVm, rec: MoveRecord) -> None:
    """The new files go, never one the definition (or QEMU) uses."""
    used = {_file(d) for d in vm.spec.disks} | _in_use(vm)
    world.files[host] -= {_file(d) for d in rec.targets.values()} - used


def _status(name: str, vm: FakeVm, rec: MoveRecord, poll: bool = False) -> httpx.Response:
    if poll and rec.phase in ("mirroring", "ready"):
        rec.polls += 1
        if vm.runstate == "gone":
            rec.phase, rec.error = "failed", "the VM's QEMU is gone: its jobs with it"
        elif rec.phase == "mirroring" and rec.polls >= 2:
            rec.phase = "ready"
    ready = rec.phase in ("ready", "switching", "pivoted", "released")
    disks = [
        DiskMirror(
            index=i,
            job=f"qm-mirror-{i}",
            source=rec.sources[i],
            target=t,
            status="ready" if ready else "running",
            offset=SIZE if ready else SIZE // 4,
            length=SIZE,
            ready=ready,
            actively_synced=ready and rec.copy_mode == "write-blocking",
        )
        for i, t in sorted(rec.targets.items())
    ]
    st = MirrorStatus(
        vm=name,
        phase=rec.phase,
        datastore=rec.datastore,
        copy_mode=rec.copy_mode,
        disks=disks,
        total_bytes=SIZE * len(disks),
        remaining_bytes=0 if ready else (SIZE - SIZE // 4) * len(disks),
        rate_bps=1e6,
        error=rec.error,
    )
    return _json(st.model_dump(mode="json"))


def _aborted(name: str, datastore: str) -> dict[str, object]:
    return MirrorStatus(vm=name, phase="aborted", datastore=datastore).model_dump(mode="json")


def _file(d: Disk) -> str:
    return f"{d.datastore}:{d.path}"
