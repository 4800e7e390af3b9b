"""The scripted agent's migration routes: incoming, outgoing, tune, dirty rate and path probe."""

from __future__ import annotations

import time

import httpx

from qmotion.agent.migration.params import stream_capabilities, stream_parameters, tune_parameters
from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import (
    DirtyRateReport,
    DirtyRateRequest,
    DirtyRateSample,
    IncomingRequest,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PathProbeRequest,
)
from qmotion.api.storage import NbdExport, NbdTargets
from qmotion.api.vm import Disk
from tests.unit.agent_world.cluster import Cluster, FakeVm, InRecord, OutRecord
from tests.unit.agent_world.qemu import BG_SYNC_S, FINISHED, MIB, Guest, Precopy, QmpError
from tests.unit.agent_world.storage_moves import unresolved
from tests.unit.agent_world.wire import _error, _host_of, _json


def incoming(world: Cluster, host: str, req: IncomingRequest) -> httpx.Response:
    """Migrations.incoming: QEMU started with -incoming defer, then configured."""
    spec = req.spec
    world.params_received.append((host, "incoming", req.params))
    nbd = None
    if req.copy_disks is not None:
        disks = list(spec.disks)
        for c in req.copy_disks.disks:
            disks[c.index] = Disk(
                datastore=req.copy_disks.datastore, path=f"{spec.name}/disk{c.index}.qcow2"
            )
        spec = spec.model_copy(update={"disks": disks})
    vm = FakeVm(spec=spec, runstate="inmigrate")
    if req.copy_disks is not None:
        vm.owned = [
            f"{spec.disks[c.index].datastore}:{spec.disks[c.index].path}"
            for c in req.copy_disks.disks
        ]
        world.files[host] |= set(vm.owned)
        nbd = NbdTargets(
            host="198.18.0.2",
            port=10809,
            exports=[NbdExport(index=c.index, name=f"disk{c.index}") for c in req.copy_disks.disks],
            disks=spec.disks,
        )
    # Paused (-S) only for a migration with an id: the word that lets it run names it.
    paused = req.migration_id is not None and req.params.destination_start == "paused"
    vm.incoming = InRecord(id=req.migration_id, start="paused" if paused else "auto")
    world.vms[host][spec.name] = vm
    try:
        caps = stream_capabilities(req.params, source=False)
        vm.qemu.set_capabilities(caps, migrating=False)
        world._qmp(host, spec.name, "migrate-set-capabilities", {"capabilities": caps})
        params = stream_parameters(req.params)
        vm.qemu.set_parameters(params)
        world._qmp(host, spec.name, "migrate-set-parameters", params)
    except QmpError as exc:
        del world.vms[host][spec.name]
        world.files[host] -= set(vm.owned)
        return _error(
            500,
            AgentErrorCode.OPERATION_FAILED,
            f"preparing incoming migration of {spec.name} failed: {exc}; "
            "the destination was removed",
            vm=spec.name,
        )
    # Like the agent: QEMU listens on the address the manager chose, else the preferred.
    listen = str(req.address) if req.address is not None else f"198.18.0.{len(host)}"
    return _json(
        {
            "uri": f"tcp:{listen}:4444",
            "port": 4444,
            "addresses": [listen],
            "nbd": nbd.model_dump(mode="json") if nbd else None,
        }
    )


def outgoing(
    world: Cluster, host: str, name: str, vm: FakeVm, req: OutgoingRequest
) -> httpx.Response:
    """Migrations.outgoing: refuse a second migration or a stopped VM, configure, migrate."""
    streaming = vm.migration in ("setup", "active", "cancelling")
    if streaming and vm.follows:
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is already migrating", vm=name)
    if (reason := unresolved(vm)) is not None:
        # The destination would open the disks the definition names: maybe not QEMU's.
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} cannot migrate now: {reason}")
    if vm.runstate not in ("running", "paused"):
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} cannot migrate while {vm.runstate}")
    if req.params.copy_datastore is None:
        vm.mirror = None
    elif vm.mirror != "ready":
        return _error(
            409, AgentErrorCode.CONFLICT, f"the disks of {name} are not in sync yet", vm=name
        )
    world.params_received.append((host, "outgoing", req.params))
    world.uris.append((host, req.uri))
    caps = stream_capabilities(req.params, source=True)
    # An agent restarted since it issued a stream does not know of it: QEMU refuses (500).
    vm.qemu.set_capabilities(caps, migrating=streaming)
    world._qmp(host, name, "migrate-set-capabilities", {"capabilities": caps})
    params = stream_parameters(req.params)
    vm.qemu.set_parameters(params)
    world._qmp(host, name, "migrate-set-parameters", params)
    # Before migrate: what QEMU reports from now on is this migration's.
    vm.outgoing = OutRecord(id=req.migration_id, uri=req.uri)
    vm.follows = True
    vm.gives_word = (
        req.migration_id is not None
        and req.peer is not None
        and req.params.destination_start == "paused"
    )
    vm.finish_ms = vm.finish_error = None
    world._qmp(host, name, "migrate", {"uri": req.uri})
    vm.migration, vm.polls, vm.started = "active", 0, time.monotonic()
    vm.transferred = 0
    guest = world.guests.get(name)
    if guest is not None:
        memory = vm.spec.memory << 20
        resident = min(guest.resident_bytes or memory, memory)
        now = world.clock.t
        vm.precopy = Precopy(
            started=now,
            memory=memory,
            resident=resident,
            bitmap=float(resident),
            bitmap_hot=float(min(guest.hot_bytes, resident)),
            bitmap_dma=float(min(guest.dma_bytes, resident)),
            expected_downtime_ms=vm.qemu.params["downtime-limit"],
            period_start=now,
            window_start=now,
            next_tick=now + BG_SYNC_S,
        )
    else:
        vm.precopy = None
    return _json(world._stats(vm))


def tune(
    world: Cluster, host: str, name: str, vm: FakeVm | None, tune: MigrationTune
) -> httpx.Response:
    """Migrations.tune: only a migration under way on this (source) host, that this agent
    issued (a restarted one does not know of it)."""
    if vm is None or not vm.follows or vm.migration in ("none", *FINISHED):
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"VM {name} has no outgoing migration to tune",
            vm=name,
        )
    params = tune_parameters(tune)
    if params:
        vm.qemu.set_parameters(params)
        world._qmp(host, name, "migrate-set-parameters", params)
    if tune.start_postcopy:
        start_postcopy(world, host, name, vm)
    return _json(world._stats(vm))


def start_postcopy(world: Cluster, host: str, name: str, vm: FakeVm) -> None:
    """migrate-start-postcopy: the source stops for good (its device state leaves), the
    destination's agent runs the VM at once (postcopy-active), pages follow on demand."""
    if not vm.qemu.caps.get("postcopy-ram") or vm.migration != "active":
        raise QmpError("Postcopy must be started after migration has been started")
    world._qmp(host, name, "migrate-start-postcopy", {})
    dst = world._destination_host(name, host)
    vm.migration, vm.runstate, vm.polls = "postcopy-active", "finish-migrate", 0
    if vm.outgoing is not None:
        vm.outgoing.postcopy = True
    if dst is not None:
        d = world.vms[dst][name]
        d.migration = "postcopy-active"
        if dst not in world.down:
            d.run_here()


def dirty_rate(
    world: Cluster, name: str, vm: FakeVm | None, req: DirtyRateRequest
) -> httpx.Response:
    """Migrations.dirty_rate: QMP calc-dirty-rate per length; QEMU answers whole MiB/s."""
    if vm is None or vm.runstate == "gone":
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is not running", vm=name)
    guest = world.guests.get(name, Guest())
    memory = vm.spec.memory << 20
    resident = min(guest.resident_bytes or memory, memory)
    samples = []
    for length in req.seconds:
        ms = max(int(length * 1000), 100)
        seconds = ms / 1000
        world._tick(seconds)
        running = vm.runstate == "running"
        written = guest.sweep_bps * seconds + guest.hot_bytes if running else 0.0
        dirtied = min(written + guest.dma_bytes, float(resident))
        rate_mib = int(dirtied / seconds / MIB)
        samples.append(
            DirtyRateSample(seconds=seconds, dirtied_bytes=int(rate_mib * MIB * seconds))
        )
    report = DirtyRateReport(samples=samples, memory_bytes=memory, resident_bytes=resident)
    return _json(report.model_dump(mode="json"))


def probe(world: Cluster, req: PathProbeRequest) -> httpx.Response:
    """netprobe.probe: RTT, then a timed upload to the peer agent."""
    peer = _host_of(req.peer.url)
    if peer not in world.hosts or peer in world.unreachable:
        return _error(
            500,
            AgentErrorCode.OPERATION_FAILED,
            f"probing the path to {req.peer.url} failed: refused",
        )
    # Like netprobe.probe: the candidates in order, the first that answers is measured;
    # none answering is the agent's 409 peer_unreachable.
    tried: list[str] = []
    address = None
    for c in req.candidates:
        if str(c) in world.dead_addresses:
            tried.append(f"{c}: connect timed out")
            continue
        address = str(c)
        break
    if req.candidates and address is None:
        return _error(
            409, AgentErrorCode.PEER_UNREACHABLE, f"no address of the peer answers: {tried}"
        )
    seconds = req.seconds if req.upload else 0.0
    world._tick(4 * world.link.rtt_ms / 1000 + seconds)
    bps = world.link.probe_bps or world.link.bandwidth_bps
    sent = min(int(bps * seconds), req.max_bytes)
    probe = PathProbe(
        rtt_ms=world.link.rtt_ms,
        bandwidth_bps=sent / seconds if seconds else 0.0,
        bytes=sent,
        seconds=seconds,
        address=address or _host_of(req.peer.url),
        unreachable=tried,
        local_mtu=1500,
        local_ifname="eth1",
    )
    return _json(probe.model_dump(mode="json"))
