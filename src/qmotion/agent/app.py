"""The agent's HTTP API (FastAPI): host facts and metrics, VM lifecycle, bearer-token auth."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response

from qmotion import __version__
from qmotion.agent import prometheus
from qmotion.agent.config import AgentConfig
from qmotion.agent.disks.storage import StorageMoves
from qmotion.agent.disks.transfer import Transfers
from qmotion.agent.errors import AgentError, Forbidden, OperationFailed, SpecRejected
from qmotion.agent.facts import HealthCheck, MetricsSampler, host_facts
from qmotion.agent.migration.migrate import Migrations
from qmotion.agent.network import netprobe
from qmotion.agent.tls import PeerListener, TlsStore
from qmotion.agent.vms import images
from qmotion.agent.vms.manager import VmManager
from qmotion.api.host import AccelInfo, HostFacts, HostMetrics, TlsCsr, TlsInstall, TlsStatus
from qmotion.api.migration import (
    MIGRATION_ID_PATTERN,
    DirtyRateReport,
    DirtyRateRequest,
    IncomingRequest,
    IncomingResponse,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PathProbeRequest,
    PostcopyRecovery,
    SteerRequest,
)
from qmotion.api.service import (
    COMMON_ERROR_STATUSES,
    bearer_auth,
    error_responses,
    install_error_handlers,
    json_error_responses,
)
from qmotion.api.storage import (
    DiskCopy,
    DiskCopyRequest,
    DiskExport,
    DiskUsage,
    ImageImportRequest,
    ImageInfo,
    MirrorRequest,
    MirrorStatus,
    NbdMirrorRequest,
)
from qmotion.api.vm import NAME_PATTERN, StopRequest, VmInfo, VmSpec
from qmotion.hypervisor.accel import choose_accel
from qmotion.hypervisor.errors import HypervisorError
from qmotion.image import ensure_image

log = logging.getLogger(__name__)
METRICS_INTERVAL_S = 2.0
DIRTY_INTERVAL_S = 60.0  # a guest's dirty rate for DRS: measured this often, for
DIRTY_SAMPLE_S = 1.0  # this long
HEALTH_INTERVAL_S = 10.0
# Any operation on a VM may also fail partway (500, OperationFailed), in the same error body.
ERROR_STATUSES = (*COMMON_ERROR_STATUSES, 500)
# A live migration's id (the manager's): the call acts on, and answers for, that one only.
MigrationQuery = Annotated[
    str | None,
    Query(pattern=MIGRATION_ID_PATTERN, description="the live migration this call is for"),
]
FinishMigration = Annotated[
    str, Query(pattern=MIGRATION_ID_PATTERN, description="the migration that completed")
]
FinishWait = Annotated[
    int, Query(ge=0, le=30_000, description="wait this long for the VM to run (ms)")
]


class AgentState:
    """What the running agent holds: its VMs, the accelerator choice, the metrics sampler."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._accel_task: asyncio.Task[AccelInfo] | None = None
        self.vms = VmManager(config, self.accel)
        self.tls = TlsStore(config.state_dir, config.name, reader=self.vms.access.user)
        # The control API's TLS context, when it is mutual TLS (set by agent.main).
        self.control_ssl: ssl.SSLContext | None = None
        self.migrations = Migrations(self.vms, self.tls)
        self.storage = StorageMoves(self.vms)
        self.transfers = Transfers(self.vms, self.tls)
        # On every address the API listens on: a path probe reaches the peer port by the
        # migration address the stream will take.
        address = config.address or "127.0.0.1"
        addresses = [address, *(a for a in config.migration_addresses if a != address)]
        self.peer = PeerListener(create_peer_app(self), addresses, config.port + 1)
        self.sampler = MetricsSampler(config.cpus)
        self.health = HealthCheck(config)

    async def accel(self) -> AccelInfo:
        if self._accel_task is None:
            self._accel_task = asyncio.ensure_future(asyncio.to_thread(self._choose_accel))
        return await asyncio.shield(self._accel_task)

    def _choose_accel(self) -> AccelInfo:
        return choose_accel(self.config.accel, ensure_image, self.vms.access.user)


def create_app(config: AgentConfig) -> FastAPI:
    state = AgentState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.vms.access.prepare)
        await asyncio.to_thread(state.tls.open_to_qemu)
        if config.cgroups and state.vms.cgroups is None:
            log.warning("no writable cgroup hierarchy here: VMs run without per-VM limits")
        elif state.vms.cgroups is not None:
            log.info("each VM in a cgroup (v%d) of its own", state.vms.cgroups.version)
        await state.vms.load()
        await state.migrations.settle_after_restart()
        # Probe (or read the cached probe) in the background; VM starts wait for it.
        probe = asyncio.ensure_future(state.accel())
        sampler = asyncio.ensure_future(_sample_forever(state))
        dirty = asyncio.ensure_future(_dirty_rates_forever(state))
        health = asyncio.ensure_future(_health_forever(state))
        if state.tls.ready:
            try:
                await state.peer.start(state.tls)
            except (OSError, ssl.SSLError) as exc:
                log.error("peer TLS port not serving: %s", exc)
        try:
            yield
        finally:
            await state.peer.stop()
            sampler.cancel()
            dirty.cancel()
            health.cancel()
            probe.cancel()
            await state.vms.close()

    app = FastAPI(
        title=f"qmotion agent {config.name}",
        version=__version__,
        lifespan=lifespan,
        responses=error_responses(*ERROR_STATUSES),
    )
    app.state.agent = state
    install_error_handlers(app, AgentError, host=config.name)
    if config.token is None and not state.tls.control_tls:
        # Neither a token nor mutual TLS: nothing would stand between the network and root.
        raise ValueError(f"agent {config.name}: no token and no mutual TLS for the control API")
    # A joined host's control API is mutual TLS (uvicorn checks the manager's certificate
    # before any request); a token then is not asked for.
    auth = [Depends(bearer_auth(config.token))] if config.token is not None else []

    @app.get("/v1/host", response_model=HostFacts, dependencies=auth)
    async def get_host() -> HostFacts:
        accel = await state.accel()
        peer_port = state.peer.port if state.peer.running else None
        ends = await asyncio.to_thread(state.tls.not_after)
        return await asyncio.to_thread(
            host_facts, config, accel, peer_port, state.health.last, ends
        )

    @app.post("/v1/tls/csr", response_model=TlsCsr, dependencies=auth)
    async def tls_csr() -> TlsCsr:
        return TlsCsr(csr_pem=await asyncio.to_thread(state.tls.csr))

    @app.put("/v1/tls", response_model=TlsStatus, dependencies=auth)
    async def tls_install(req: TlsInstall) -> TlsStatus:
        await asyncio.to_thread(state.tls.install, req.ca_pem, req.cert_pem)
        if state.control_ssl is not None:
            # A renewed certificate serves the control API's next handshakes at once.
            await asyncio.to_thread(state.tls.reload_control, state.control_ssl)
        try:
            await state.peer.start(state.tls)
        except (OSError, ssl.SSLError) as exc:
            raise OperationFailed(f"peer TLS port {state.peer.port}: {exc}") from exc
        return TlsStatus(peer_port=state.peer.port)

    @app.get("/v1/metrics", response_model=HostMetrics, dependencies=auth)
    async def get_metrics() -> HostMetrics:
        return state.sampler.last or state.sampler.sample(state.vms.running_processes())

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=auth,
        responses=json_error_responses(*ERROR_STATUSES),
        summary="Prometheus metrics: VMs, host CPU and memory, migrations (text format 0.0.4)",
    )
    async def prometheus_metrics() -> Response:
        host = state.sampler.last or state.sampler.sample(state.vms.running_processes())
        outgoing, incoming = state.migrations.in_flight()
        vm_states = [vm.state for vm in await state.vms.list()]
        body = prometheus.exposition(host, vm_states, len(outgoing), len(incoming))
        return Response(body, media_type=prometheus.CONTENT_TYPE)

    @app.get("/v1/vms", response_model=list[VmInfo], dependencies=auth)
    async def list_vms() -> list[VmInfo]:
        return await state.vms.list()

    @app.post("/v1/vms", response_model=VmInfo, status_code=201, dependencies=auth)
    async def define_vm(spec: VmSpec) -> VmInfo:
        return await state.vms.define(spec)

    @app.get("/v1/vms/{name}", response_model=VmInfo, dependencies=auth)
    async def get_vm(name: str) -> VmInfo:
        return await state.vms.info(name)

    @app.post("/v1/vms/{name}/start", response_model=VmInfo, dependencies=auth)
    async def start_vm(name: str) -> VmInfo:
        return await state.vms.start(name)

    @app.post("/v1/vms/{name}/suspend", response_model=VmInfo, dependencies=auth)
    async def suspend_vm(name: str) -> VmInfo:
        return await state.vms.suspend(name)

    @app.post("/v1/vms/{name}/stop", response_model=VmInfo, dependencies=auth)
    async def stop_vm(name: str, req: StopRequest | None = None) -> VmInfo:
        req = req or StopRequest()
        return await state.vms.stop(name, force=req.force, timeout_s=req.timeout_s)

    @app.delete("/v1/vms/{name}", status_code=204, dependencies=auth)
    async def delete_vm(
        name: str, force: bool = False, with_disks: bool = False, migration: MigrationQuery = None
    ) -> None:
        await state.migrations.delete(name, force=force, with_disks=with_disks, migration=migration)

    @app.post("/v1/vms/{name}/export", response_model=list[DiskExport], dependencies=auth)
    async def export_disks(
        name: str,
        copy: bool = True,
        reader: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    ) -> list[DiskExport]:
        """``reader``: the only host that may read the exports (by its certificate)."""
        return await state.transfers.export(name, copy=copy, reader=reader)

    @app.delete("/v1/vms/{name}/export", status_code=204, dependencies=auth)
    async def unexport_disks(name: str, release: bool = True) -> None:
        await state.transfers.unexport(name, release=release)

    @app.post("/v1/disk-copies", response_model=DiskCopy, dependencies=auth)
    async def copy_disk(req: DiskCopyRequest) -> DiskCopy:
        return await state.transfers.copy(req)

    @app.delete("/v1/disk-copies", dependencies=auth)
    async def remove_disk_copy(datastore: str, path: str) -> dict[str, bool]:
        return {"removed": await state.transfers.remove_copy(datastore, path)}

    @app.get(
        "/v1/vms/{name}/console",
        response_class=PlainTextResponse,
        dependencies=auth,
        responses=json_error_responses(*ERROR_STATUSES),
    )
    async def console(
        name: str, tail_bytes: Annotated[int, Query(ge=1, le=16 << 20)] = 65536
    ) -> str:
        return state.vms.console(name, tail_bytes)

    @app.post("/v1/migrations/incoming", response_model=IncomingResponse, dependencies=auth)
    async def incoming(req: IncomingRequest) -> IncomingResponse:
        return await state.migrations.incoming(req)

    @app.post("/v1/vms/{name}/migration", response_model=MigrationStats, dependencies=auth)
    async def migrate(name: str, req: OutgoingRequest) -> MigrationStats:
        return await state.migrations.outgoing(name, req)

    @app.get("/v1/vms/{name}/migration", response_model=MigrationStats, dependencies=auth)
    async def migration_stats(
        name: str,
        wait_ms: Annotated[int, Query(ge=0, le=30_000)] = 0,
        known_status: str | None = None,
        migration: MigrationQuery = None,
    ) -> MigrationStats:
        return await state.migrations.stats(name, wait_ms, known_status, migration)

    @app.patch("/v1/vms/{name}/migration", response_model=MigrationStats, dependencies=auth)
    async def migration_tune(name: str, tune: MigrationTune) -> MigrationStats:
        return await state.migrations.tune(name, tune)

    @app.post("/v1/vms/{name}/dirty-rate", response_model=DirtyRateReport, dependencies=auth)
    async def dirty_rate(name: str, req: DirtyRateRequest) -> DirtyRateReport:
        return await state.migrations.dirty_rate(name, req.seconds)

    @app.post("/v1/net/probe", response_model=PathProbe, dependencies=auth)
    async def net_probe(req: PathProbeRequest) -> PathProbe:
        tls = None
        if req.peer.url.startswith("https:") and state.tls.ready:
            tls = await asyncio.to_thread(state.tls.client_context)
        return await netprobe.probe(req, tls)

    @app.post("/v1/net/sink", dependencies=auth)
    async def net_sink(request: Request) -> dict[str, int]:
        return await drain(request)

    @app.post(
        "/v1/vms/{name}/migration/recover-incoming",
        response_model=PostcopyRecovery,
        dependencies=auth,
    )
    async def migration_recover_incoming(
        name: str, req: PostcopyRecovery | None = None
    ) -> PostcopyRecovery:
        return await state.migrations.recover_incoming(name, req)

    @app.post("/v1/vms/{name}/migration/resume", response_model=MigrationStats, dependencies=auth)
    async def migration_resume(name: str, req: PostcopyRecovery) -> MigrationStats:
        return await state.migrations.reconnect_outgoing(name, req)

    @app.post("/v1/vms/{name}/migration/cancel", response_model=MigrationStats, dependencies=auth)
    async def migration_cancel(name: str, migration: MigrationQuery = None) -> MigrationStats:
        return await state.migrations.cancel(name, migration)

    @app.post("/v1/vms/{name}/migration/finish", response_model=VmInfo, dependencies=auth)
    async def migration_finish(
        name: str, migration: FinishMigration, wait_ms: FinishWait = 0
    ) -> VmInfo:
        return await state.migrations.finish(name, migration, wait_ms)

    @app.post("/v1/vms/{name}/steer", dependencies=auth)
    async def steer(name: str, req: SteerRequest) -> dict[str, float]:
        return {"ms": await state.migrations.steer(name, req)}

    @app.post("/v1/vms/{name}/release", status_code=204, dependencies=auth)
    async def release(name: str, migration: MigrationQuery = None) -> None:
        await state.migrations.release(name, migration)

    @app.post("/v1/vms/{name}/resume", dependencies=auth)
    async def resume(
        name: str, after_failed_switchover: bool = False, migration: MigrationQuery = None
    ) -> dict[str, str]:
        status = await state.migrations.resume(name, after_failed_switchover, migration)
        return {"qemu_status": status}

    @app.post("/v1/vms/{name}/announce", status_code=204, dependencies=auth)
    async def announce(name: str) -> None:
        await state.migrations.announce(name)

    @app.get("/v1/vms/{name}/disks", response_model=list[DiskUsage], dependencies=auth)
    async def vm_disks(name: str) -> list[DiskUsage]:
        return await state.storage.disks(name)

    @app.post("/v1/vms/{name}/storage-move", response_model=MirrorStatus, dependencies=auth)
    async def storage_move(name: str, req: MirrorRequest) -> MirrorStatus:
        return await state.storage.start(name, req)

    @app.post("/v1/vms/{name}/storage-move/check", response_model=MirrorStatus, dependencies=auth)
    async def storage_move_check(name: str, req: MirrorRequest) -> MirrorStatus:
        return await state.storage.check(name, req)

    @app.get("/v1/vms/{name}/storage-move", response_model=MirrorStatus, dependencies=auth)
    async def storage_move_status(name: str) -> MirrorStatus:
        return await state.storage.status(name)

    @app.post(
        "/v1/vms/{name}/storage-move/activate", response_model=MirrorStatus, dependencies=auth
    )
    async def storage_move_activate(name: str) -> MirrorStatus:
        return await state.storage.activate(name)

    @app.post("/v1/vms/{name}/storage-move/pivot", response_model=MirrorStatus, dependencies=auth)
    async def storage_move_pivot(name: str) -> MirrorStatus:
        return await state.storage.pivot(name)

    @app.post("/v1/vms/{name}/storage-move/release", response_model=MirrorStatus, dependencies=auth)
    async def storage_move_release(name: str) -> MirrorStatus:
        return await state.storage.release(name)

    @app.post("/v1/vms/{name}/storage-move/abort", response_model=MirrorStatus, dependencies=auth)
    async def storage_move_abort(name: str) -> MirrorStatus:
        return await state.storage.abort(name)

    @app.post("/v1/images", response_model=ImageInfo, dependencies=auth)
    async def import_image(req: ImageImportRequest) -> ImageInfo:
        return await asyncio.to_thread(images.import_image, config, req)

    @app.put("/v1/images/{name}/upload", response_model=ImageInfo, dependencies=auth)
    async def upload_image(
        name: Annotated[str, Path(pattern=NAME_PATTERN)],
        datastore: Annotated[str, Query(min_length=1, max_length=64)],
        request: Request,
    ) -> ImageInfo:
        """The image in the request body (streamed to the datastore, never held in memory),
        then checked and imported like a file of the datastore (no backing file allowed)."""
        partial = await asyncio.to_thread(images.upload_file, config, datastore)
        limit = await asyncio.to_thread(images.room, config, datastore)
        try:
            received = 0
            with await asyncio.to_thread(partial.open, "wb") as f:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise SpecRejected(
                            f"the upload outgrew datastore {datastore}'s free space "
                            f"({limit >> 20} MiB with room for the import's copy)",
                            field="datastore",
                        )
                    await asyncio.to_thread(f.write, chunk)
            req = ImageImportRequest(file=str(partial), name=name, datastore=datastore)
            return await asyncio.to_thread(images.import_image, config, req, False)
        finally:
            partial.unlink(missing_ok=True)

    @app.post("/v1/migrations/incoming/check", status_code=204, dependencies=auth)
    async def incoming_check(req: IncomingRequest) -> None:
        await state.migrations.check_incoming(req)

    @app.post("/v1/vms/{name}/migration/keep-disks", status_code=204, dependencies=auth)
    async def migration_keep_disks(name: str, migration: MigrationQuery = None) -> None:
        await state.migrations.keep_disks(name, migration)

    @app.post("/v1/vms/{name}/migration/mirror", response_model=MirrorStatus, dependencies=auth)
    async def migration_mirror(name: str, req: NbdMirrorRequest) -> MirrorStatus:
        return await state.migrations.nbd.start(name, req)

    @app.get("/v1/vms/{name}/migration/mirror", response_model=MirrorStatus, dependencies=auth)
    async def migration_mirror_status(name: str) -> MirrorStatus:
        return await state.migrations.nbd.status(name)

    @app.post(
        "/v1/vms/{name}/migration/mirror/abort", response_model=MirrorStatus, dependencies=auth
    )
    async def migration_mirror_abort(name: str) -> MirrorStatus:
        return await state.migrations.nbd.abort(name)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "host": config.name}

    return app


async def drain(request: Request) -> dict[str, int]:
    """A path probe's sink: reads the upload, keeps nothing, says how much came."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
    return {"bytes": received}


def create_peer_app(state: AgentState) -> FastAPI:
    """What other agents may call, on the mutual-TLS port: their certificate is their
    credential (the cluster CA signed it), so no agent holds another's bearer token."""
    peer = FastAPI(title=f"qmotion agent {state.config.name} (peers)", version=__version__)
    install_error_handlers(peer, AgentError, host=state.config.name)

    def from_source(name: str, request: Request) -> None:
        """Any host of the cluster gets past TLS; only the source the manager named for this
        VM's incoming migration gets further (by the address it calls from)."""
        state.vms.spec(name)  # 404 for a VM not here (and never a path off a name)
        rec = state.vms.records.get(name)
        allowed = rec.incoming.source if rec.incoming is not None else []
        caller = request.client.host if request.client else None
        if allowed and caller not in allowed:
            raise Forbidden(f"{caller} is not the source of {name}'s incoming migration", vm=name)

    @peer.post("/v1/peer/vms/{name}/steer")
    async def steer(name: str, req: SteerRequest, request: Request) -> dict[str, float]:
        from_source(name, request)
        return {"ms": await state.migrations.steer(name, req)}

    @peer.post("/v1/peer/vms/{name}/migration/finish", response_model=VmInfo)
    async def finish(
        name: str, migration: FinishMigration, request: Request, wait_ms: FinishWait = 0
    ) -> VmInfo:
        from_source(name, request)
        return await state.migrations.finish(name, migration, wait_ms)

    @peer.post("/v1/peer/net/sink")
    async def net_sink(request: Request) -> dict[str, int]:
        """The timed upload of another host's path probe (dry runs, first migrations)."""
        return await drain(request)

    @peer.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "host": state.config.name}

    return peer


class DirtyRateSource(Protocol):
    """What one round of dirty-rate sampling needs from the agent (tests give a fake)."""

    def names(self) -> list[str]: ...

    def migrating(self, name: str) -> bool: ...

    async def status(self, name: str) -> str: ...

    async def measure(self, name: str) -> float | None: ...


async def sample_dirty_rates(src: DirtyRateSource, rates: dict[str, float]) -> None:
    """One round: each running guest's dirty rate (MiB/s) into ``rates``, for the manager's
    DRS (its migration cost). Never during a migration of that VM, never of a QEMU that is
    not running a guest (an incoming one); a VM that is gone is forgotten; a failure skips
    that VM only."""
    names = src.names()
    for name in names:
        try:
            if src.migrating(name) or await src.status(name) != "running":
                continue
            rate = await src.measure(name)
            if rate is not None:  # None: a migration began meanwhile
                rates[name] = rate
        except (AgentError, HypervisorError) as exc:  # gone meanwhile, or busy
            log.debug("dirty rate of %s not measured: %s", name, exc)
    for name in set(rates) - set(names):
        del rates[name]


class _AgentDirtyRates:
    def __init__(self, state: AgentState) -> None:
        self.state = state

    def names(self) -> list[str]:
        return [vm.name for vm in self.state.vms.running_processes()]

    def migrating(self, name: str) -> bool:
        return self.state.migrations.migrating(name)

    async def status(self, name: str) -> str:
        return str((await self.state.vms.monitor(name).execute("query-status")).get("status"))

    async def measure(self, name: str) -> float | None:
        return await self.state.migrations.sample_dirty_rate(name, DIRTY_SAMPLE_S)


async def _dirty_rates_forever(state: AgentState) -> None:
    source = _AgentDirtyRates(state)
    while True:
        await asyncio.sleep(DIRTY_INTERVAL_S)
        try:
            await sample_dirty_rates(source, state.sampler.dirty)
        except Exception:  # sampling must outlive one bad round
            log.exception("dirty-rate sampling failed")


async def _health_forever(state: AgentState) -> None:
    while True:
        await state.health.check()
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def _sample_forever(state: AgentState) -> None:
    while True:
        try:
            state.sampler.sample(state.vms.running_processes())
        except OSError as exc:
            log.warning("metrics sample failed: %s", exc)
        await asyncio.sleep(METRICS_INTERVAL_S)
