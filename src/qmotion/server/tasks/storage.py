"""The manager's side of Storage vMotion: pre-checks, and the port that calls the VM's agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from qmotion.api.errors import AgentErrorCode
from qmotion.api.storage import DiskFormat, MirrorRequest, MirrorStatus
from qmotion.api.vm import VmSpec, VmState
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError
from qmotion.migration.prechecks import Refusal
from qmotion.migration.storage import StoragePortError
from qmotion.server.db import Database, Host
from qmotion.server.inventory import Inventory

T = TypeVar("T")
CALL_TIMEOUT_S = 60.0  # a pivot waits for every job's last sync (agent: 30 s at most)


def storage_prechecks(
    spec: VmSpec,
    state: VmState,
    host: str,
    host_datastores: frozenset[str],
    datastore: str,
    disk_format: DiskFormat | None,
    migrating: bool,
) -> list[Refusal]:
    """Why a storage move cannot start, before anything changes (pure). Free space is the
    agent's check: only it sees the datastore's file system."""
    out = []
    if migrating:
        out.append(Refusal("already_migrating", f"VM {spec.name} is already migrating", 409))
    if state != VmState.RUNNING:
        out.append(
            Refusal(
                "vm_not_running",
                f"VM {spec.name} is {state}: a storage move needs it running "
                "(a stopped VM's disks are copied by a cold migration)",
                409,
            )
        )
    if not spec.disks:
        out.append(
            Refusal("no_disks", f"VM {spec.name} has no disks to move", 409, field="datastore")
        )
    elif all(d.datastore == datastore for d in spec.disks):
        out.append(
            Refusal(
                "already_there",
                f"every disk of {spec.name} is already on datastore {datastore}",
                409,
                field="datastore",
            )
        )
    if datastore not in host_datastores:
        known = ", ".join(sorted(host_datastores)) or "none"
        out.append(
            Refusal(
                "datastore_unreachable",
                f"datastore {datastore} is not reachable from host {host}, where {spec.name} "
                f"runs (it reaches: {known})",
                422,
                host=host,
                field="datastore",
            )
        )
    if disk_format is not None and disk_format not in ("qcow2", "raw"):
        out.append(Refusal("bad_format", f"disk format {disk_format} is not supported", 422))
    return out


class AgentStoragePort:
    """One storage move of ``vm`` on ``host``: each call is one agent request."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        vm: str,
        host: Host,
        request: MirrorRequest,
    ) -> None:
        self.db, self.inventory, self.vm, self.host, self.request = db, inventory, vm, host, request
        self.last: MirrorStatus | None = None

    async def _call(self, fn: Callable[[AgentClient], T]) -> T:
        def work() -> T:
            with self.inventory.agents.client(
                self.host.agent_url, self.host.token, CALL_TIMEOUT_S
            ) as client:
                return fn(client)

        try:
            return await asyncio.to_thread(work)
        except ApiError as exc:
            # 4xx: the agent refused and changed nothing; 5xx: it failed partway.
            raise StoragePortError(
                f"host {self.host.name}: {exc}",
                refused=exc.status < 500,
                switched=exc.detail.code == AgentErrorCode.ALREADY_SWITCHED,
            ) from exc
        except ClientError as exc:
            raise StoragePortError(f"host {self.host.name}: {exc}") from exc

    async def _step(self, step: str) -> MirrorStatus:
        got = await self._call(lambda c: c.storage_move_step(self.vm, step))
        self.last = got
        return got

    async def start(self) -> MirrorStatus:
        got = await self._call(lambda c: c.storage_move(self.vm, self.request))
        self.last = got
        return got

    async def status(self) -> MirrorStatus:
        got = await self._call(lambda c: c.storage_move_status(self.vm))
        self.last = got
        return got

    async def activate(self) -> MirrorStatus:
        return await self._step("activate")

    async def pivot(self) -> MirrorStatus:
        got = await self._step("pivot")
        # The pivot happened: an inventory update that fails now must not read as a failed
        # pivot (release updates it again, and the task's end once more).
        with contextlib.suppress(StoragePortError):
            await self.adopt()
        return got

    async def release(self) -> MirrorStatus:
        # Before the old files go: a pivot whose answer was lost reaches here by status.
        await self.adopt()
        return await self._step("release")

    async def abort(self) -> MirrorStatus:
        return await self._step("abort")

    async def adopt(self) -> None:
        """The inventory names the disks the agent's definition names (after the pivot)."""
        try:
            info = await self._call(lambda c: c.vm(self.vm))
        except StoragePortError as exc:
            raise StoragePortError(str(exc)) from exc  # never a "refused": nothing to refuse

        def update() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, self.vm)
                row.spec = info.spec.model_dump(mode="json")

        await asyncio.to_thread(update)
