"""The manager's REST API (FastAPI, OpenAPI at /openapi.json): bearer tokens, roles, audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request, Response

from qmotion import __version__
from qmotion.api import paging
from qmotion.api.drs import MigrationTarget
from qmotion.api.migration import MigrationPrediction
from qmotion.api.server import (
    HostOut,
    HostRegister,
    ImageImport,
    ImageOut,
    MigrateRequest,
    PoolSet,
    ResolveRequest,
    TaskOut,
    VmCreate,
    VmOut,
)
from qmotion.api.service import (
    COMMON_ERRORS,
    error_responses,
    install_error_handlers,
)
from qmotion.api.vm import NAME_PATTERN, StopRequest
from qmotion.pki import ClusterCA, ManagerTls
from qmotion.server.access import Access
from qmotion.server.agents import AgentConnector
from qmotion.server.automation.actions import ManagerActions
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.maintenance import Maintenance
from qmotion.server.automation.operations import Operations
from qmotion.server.automation.schedules import Schedules
from qmotion.server.automation.targets import migration_targets
from qmotion.server.console.base import Console
from qmotion.server.console.install import install_console
from qmotion.server.console.render import Renderer
from qmotion.server.console.session import Sessions
from qmotion.server.db import Database
from qmotion.server.enrol import Enrolment
from qmotion.server.errors import ManagerError
from qmotion.server.http.access_routes import (
    AuditMiddleware,
    install_access_routes,
    role_check,
)
from qmotion.server.http.drs_routes import install_drs_routes
from qmotion.server.http.enrol_routes import install_enrol_routes
from qmotion.server.http.metrics import install_metrics
from qmotion.server.http.schedule_routes import install_routes as install_schedule_routes
from qmotion.server.images import ImageLibrary
from qmotion.server.inventory import Inventory
from qmotion.server.reconciler import Reconciler
from qmotion.server.replicas import DEFAULT_LEASE_S, DEFAULT_NAME, Membership, while_leading
from qmotion.server.tasks.runner import TaskRunner
from qmotion.server.tasks.task_view import DRS_APPLY, MAINTENANCE

log = logging.getLogger(__name__)
REFRESH_INTERVAL_S = 15.0
WORKER_THREADS = 64
# Task ids are the database's 64-bit integer keys.
TaskId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# Routes that act through a host's agent.
AGENT_ERRORS = error_responses(502)


def create_app(
    db_url: str,
    token: str,
    agents: AgentConnector | None = None,
    ca: ClusterCA | None = None,
    manager_tls: ManagerTls | None = None,
    manager_addresses: tuple[str, ...] = (),
    replica: str = DEFAULT_NAME,
    lease_s: float = DEFAULT_LEASE_S,
    address: str | None = None,
    exclusive: bool = False,
) -> FastAPI:
    """The manager; ``agents`` is the seam to the host agents (tests pass in-process ones);
    ``ca``: the cluster CA that makes migrations TLS (None: the cluster is insecure);
    ``manager_tls``: the client certificate joined hosts' agents are called with;
    ``replica``: this process's name among the managers on the database (see replicas),
    ``lease_s`` their lease, ``address`` where this one serves (shown to operators);
    ``exclusive``: a real server, which never takes a name another live process holds."""
    db = Database(db_url)
    inventory = Inventory(db, agents or AgentConnector(tls=manager_tls), ca, manager_addresses)
    membership = Membership(db, replica, lease_s, address, exclusive=exclusive)
    runner = TaskRunner(db, inventory, membership=membership)
    library = ImageLibrary(db, inventory)
    operations = Operations(db, runner)
    drs = ClusterDrs(db, inventory, operations)
    maintenance = Maintenance(db, runner, drs, operations)
    actions = ManagerActions(runner, drs, maintenance)
    schedules = Schedules(db, actions)
    reconciler = Reconciler(inventory)

    def after_takeover(ended: list[str]) -> None:
        # An apply or evacuation whose replica died: its recommendations are released, and
        # a host it left entering maintenance goes on being evacuated (by this replica).
        if DRS_APPLY in ended:
            drs.recover_after_restart()
        if MAINTENANCE in ended:
            maintenance.resume_after_restart()

    runner.after_takeover.append(after_takeover)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Agent and database calls run in threads, each migration's polls in one: the
        # default pool (cores + 4) would queue a host's four moves behind each other.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="manager")
        )
        runner.recover_after_restart()
        drs.recover_after_restart()
        maintenance.resume_after_restart()
        loops = [
            asyncio.ensure_future(runner.keep_leases()),
            # Cluster-wide rounds run on one replica: the leader's.
            asyncio.ensure_future(
                while_leading(
                    membership,
                    lambda: [
                        _refresh_forever(inventory, drs, reconciler),
                        drs.run_forever(),
                        schedules.run_forever(),
                    ],
                )
            ),
        ]
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await runner.shutdown()
            # Another replica takes this one's tasks over now, not a lease later.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(membership.leave)

    app = FastAPI(
        title="qmotion manager", version=__version__, lifespan=lifespan, responses=COMMON_ERRORS
    )
    app.state.runner = runner
    # The manager's own services, for in-process tools (the scale bench) and tests.
    app.state.inventory, app.state.drs, app.state.reconciler = inventory, drs, reconciler
    app.state.membership = membership
    install_error_handlers(app, ManagerError)
    access = Access(db, token)
    auth = [Depends(role_check(access))]
    app.add_middleware(AuditMiddleware, access=access)
    install_access_routes(app, access, auth)
    install_enrol_routes(app, Enrolment(db, ca, manager_tls), inventory, auth)

    @app.post("/v1/hosts", response_model=HostOut, status_code=201, dependencies=auth)
    def register_host(req: HostRegister) -> HostOut:
        return inventory.register_host(req)

    @app.get("/v1/hosts", response_model=list[HostOut], dependencies=auth)
    def list_hosts() -> list[HostOut]:
        return inventory.list_hosts()

    @app.post("/v1/hosts/refresh", response_model=list[HostOut], dependencies=auth)
    def refresh_hosts() -> list[HostOut]:
        inventory.refresh_hosts(drs.config.settings().down_grace_s, lambda _host, m: drs.sample(m))
        reconciler.run()
        return inventory.list_hosts()

    @app.put("/v1/pool", status_code=204, dependencies=auth)
    def set_pool(pool: PoolSet) -> None:
        inventory.set_pool(pool)

    @app.get("/v1/images", response_model=list[ImageOut], dependencies=auth)
    def list_images() -> list[ImageOut]:
        return library.list()

    @app.post(
        "/v1/images",
        response_model=ImageOut,
        status_code=201,
        dependencies=auth,
        responses=AGENT_ERRORS,
    )
    def import_image(req: ImageImport) -> ImageOut:
        return library.import_image(req)

    @app.put(
        "/v1/images/{name}/upload",
        response_model=ImageOut,
        status_code=201,
        dependencies=auth,
        responses=AGENT_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def upload_image(
        name: Annotated[str, Path(pattern=NAME_PATTERN)],
        request: Request,
        datastore: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    ) -> ImageOut:
        """The image file in the body (qcow2 or raw, no backing file), streamed through to
        an up host that has the datastore, checked and imported there."""
        client = request.client.host if request.client else "?"
        return await library.upload(name, datastore, request.stream(), client)

    @app.get("/v1/vms", response_model=list[VmOut], dependencies=auth, responses=paging.PAGED)
    def list_vms(
        response: Response, limit: paging.VmLimit = None, after: paging.VmCursor = None
    ) -> list[VmOut]:
        rows = inventory.list_vms(None if limit is None else limit + 1, after)
        return paging.page(response, rows, limit, lambda v: v.name)

    @app.post(
        "/v1/vms",
        response_model=VmOut,
        status_code=201,
        dependencies=auth,
        responses=AGENT_ERRORS,
    )
    def create_vm(req: VmCreate) -> VmOut:
        return drs.create_vm(req, force=req.force)

    @app.get("/v1/vms/{name}", response_model=VmOut, dependencies=auth)
    def show_vm(name: str) -> VmOut:
        return inventory.show_vm(name)

    @app.post(
        "/v1/vms/{name}/start", response_model=VmOut, dependencies=auth, responses=AGENT_ERRORS
    )
    def start_vm(name: str) -> VmOut:
        return inventory.start_vm(name)

    @app.post(
        "/v1/vms/{name}/suspend", response_model=VmOut, dependencies=auth, responses=AGENT_ERRORS
    )
    def suspend_vm(name: str) -> VmOut:
        return inventory.suspend_vm(name)

    @app.post(
        "/v1/vms/{name}/stop", response_model=VmOut, dependencies=auth, responses=AGENT_ERRORS
    )
    def stop_vm(name: str, req: StopRequest | None = None) -> VmOut:
        return inventory.stop_vm(name, force=(req or StopRequest()).force)

    @app.post(
        "/v1/vms/{name}/resolve", response_model=VmOut, dependencies=auth, responses=AGENT_ERRORS
    )
    def resolve_vm(name: str, req: ResolveRequest | None = None) -> VmOut:
        return inventory.resolve_vm(name, keep=(req or ResolveRequest()).keep)

    @app.delete("/v1/vms/{name}", status_code=204, dependencies=auth, responses=AGENT_ERRORS)
    def delete_vm(name: str, force: bool = False) -> None:
        inventory.delete_vm(name, force=force)

    @app.post("/v1/vms/{name}/migrate", response_model=TaskOut, status_code=202, dependencies=auth)
    async def migrate(name: str, req: MigrateRequest) -> TaskOut:
        return await actions.submit_migration(name, req)

    @app.post(
        "/v1/vms/{name}/migrate/plan",
        response_model=MigrationPrediction,
        dependencies=auth,
        responses=AGENT_ERRORS,
        summary="Dry run: measure the guest and the path, predict the migration, start nothing",
    )
    async def migrate_plan(name: str, req: MigrateRequest) -> MigrationPrediction:
        return await runner.predict_migration(name, req)

    @app.get(
        "/v1/vms/{name}/migrate/targets",
        response_model=list[MigrationTarget],
        dependencies=auth,
        summary="Every host ranked for moving this VM, with the pre-checks' verdict; "
        "nothing changes",
    )
    def migrate_targets(
        name: str, datastore: Annotated[str | None, Query(min_length=1, max_length=64)] = None
    ) -> list[MigrationTarget]:
        """With ``datastore``: the disks move there too (shared-nothing, or a storage move
        on the VM's own host). Asks no agent: what only an agent answers is checked when the
        move is submitted."""
        return migration_targets(drs, runner, name, datastore)

    @app.get("/v1/tasks", response_model=list[TaskOut], dependencies=auth, responses=paging.PAGED)
    def list_tasks(
        response: Response, limit: paging.TaskLimit = 100, after: paging.TaskCursor = None
    ) -> list[TaskOut]:
        return paging.page(response, runner.list(limit + 1, after), limit, lambda t: t.id)

    @app.get("/v1/tasks/{task_id}", response_model=TaskOut, dependencies=auth)
    def get_task(task_id: TaskId) -> TaskOut:
        return runner.get(task_id)

    @app.post("/v1/tasks/{task_id}/cancel", response_model=TaskOut, dependencies=auth)
    async def cancel_task(task_id: TaskId) -> TaskOut:
        return runner.cancel(task_id)

    install_drs_routes(app, drs, maintenance, auth)
    install_console(
        app,
        Console(
            inventory=inventory,
            runner=runner,
            drs=drs,
            maintenance=maintenance,
            schedules=schedules,
            actions=actions,
            access=access,
            sessions=Sessions(access, db),
            render=Renderer(),
        ),
    )
    install_schedule_routes(app, schedules, auth)
    install_metrics(app, db, inventory, drs, auth)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _refresh_forever(inventory: Inventory, drs: ClusterDrs, reconciler: Reconciler) -> None:
    """A round every REFRESH_INTERVAL_S from the start of the last (not after its end): a
    host is read again within the period however long a round over many hosts takes."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        due += REFRESH_INTERVAL_S
        await asyncio.sleep(max(0.0, due - loop.time()))
        due = max(due, loop.time() - REFRESH_INTERVAL_S)  # a round longer than the period
        try:
            grace = (await asyncio.to_thread(drs.config.settings)).down_grace_s
            await asyncio.to_thread(inventory.refresh_hosts, grace, lambda _host, m: drs.sample(m))
            # After the facts: which hosts are up decides which agents are asked.
            await asyncio.to_thread(reconciler.run)
        except Exception:  # the refresher must outlive one bad round
            log.exception("host refresh failed")
