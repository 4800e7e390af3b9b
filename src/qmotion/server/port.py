"""The migration engine's port in the manager: each action done through the two agents."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from qmotion.api.migration import (
    IncomingRequest,
    MigrationParams,
    MigrationStats,
    OutgoingRequest,
    PeerRef,
)
from qmotion.api.vm import VmSpec
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ClientError, NotFound
from qmotion.migration.errors import Refused, StepError, SwitchedOver
from qmotion.migration.prechecks import PrecheckInput, VmView, precheck
from qmotion.server.db import Database, Host
from qmotion.server.inventory import Inventory

T = TypeVar("T")
PROGRESS_WAIT_MS = 500
VERIFY_TIMEOUT_S = 30.0
STALL_TIMEOUT_S = 30.0  # an active migration that moves no data for this long is abandoned


def vm_view(spec: VmSpec, host: str, state: str, migrating: bool) -> VmView:
    return VmView(
        name=spec.name,
        host=host,
        state=state,
        memory_mib=spec.memory,
        cpu_model=spec.cpu_model,
        machine=spec.machine,
        bridges=tuple(n.bridge for n in spec.nics),
        datastores=tuple(d.datastore for d in spec.disks),
        migrating=migrating,
    )


class AgentMigrationPort:
    """One migration of ``vm`` from ``source`` to ``destination``."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        vm: str,
        source: str,
        destination: str,
        params: MigrationParams,
    ) -> None:
        self.db, self.inventory = db, inventory
        self.vm, self.source, self.destination, self.params = vm, source, destination, params
        with db.session() as s:
            row = inventory.vm_by_name(s, vm)
            self.spec = VmSpec.model_validate(row.spec)
            self._src = self._host_copy(inventory.host_by_name(s, source))
            self._dst = self._host_copy(inventory.host_by_name(s, destination))
        self.migrate_issued_at: float | None = None
        self.last_stats: MigrationStats | None = None
        self.destination_events: list[tuple[str, float]] = []
        self._last_transferred = -1
        self._progress_at = time.monotonic()

    @staticmethod
    def _host_copy(h: Host) -> Host:
        return Host(name=h.name, agent_url=h.agent_url, token=h.token)

    async def _call(
        self, host: Host, step: str, fn: Callable[[AgentClient], T], timeout_s: float = 120.0
    ) -> T:
        def work() -> T:
            with self.inventory.agents.client(host.agent_url, host.token, timeout_s) as client:
                return fn(client)

        try:
            return await asyncio.to_thread(work)
        except ClientError as exc:
            raise StepError(step, f"host {host.name}: {exc}", vm=self.vm, host=host.name) from exc

    # ------------------------------------------------------------------ the actions

    async def prechecks(self) -> None:
        def check() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, self.vm)
                hosts = self.inventory.host_views(s)
                # This task itself counts as committed memory on the destination.
                dst = hosts.get(self.destination)
                if dst is not None:
                    hosts[self.destination] = replace(
                        dst, committed_mib=dst.committed_mib - self.spec.memory
                    )
                inp = PrecheckInput(
                    vm_view(self.spec, row.host.name, row.state, False), self.destination, hosts
                )
            refusals = precheck(inp)
            if refusals:
                raise Refused(self.vm, refusals)

        await asyncio.to_thread(check)

    async def prepare_destination(self) -> str:
        req = IncomingRequest(spec=self.spec, params=self.params)
        resp = await self._call(self._dst, "prepare destination", lambda c: c.incoming(req))
        return resp.uri

    async def start_migration(self, uri: str) -> None:
        peer = PeerRef(url=self._dst.agent_url, token=self._dst.token, vm=self.vm)
        req = OutgoingRequest(uri=uri, params=self.params, peer=peer)
        self.last_stats = await self._call(
            self._src, "start migration", lambda c: c.migrate(self.vm, req)
        )
        self.migrate_issued_at = time.monotonic()

    async def progress(self, known_status: str | None) -> MigrationStats:
        stats = await self._call(
            self._src,
            "monitor",
            lambda c: c.migration(self.vm, wait_ms=PROGRESS_WAIT_MS, known_status=known_status),
            timeout_s=30,
        )
        for _ in range(25):
            # QEMU flips the status to completed a moment before it fills in the totals.
            if stats.status != "completed" or stats.total_time_ms:
                break
            await asyncio.sleep(0.02)
            stats = await self._call(self._src, "monitor", lambda c: c.migration(self.vm))
        self.last_stats = stats
        now = time.monotonic()
        if stats.transferred != self._last_transferred or stats.status != "active":
            self._last_transferred, self._progress_at = stats.transferred, now
        elif now - self._progress_at > STALL_TIMEOUT_S:
            raise StepError(
                "monitor",
                f"no data moved for {STALL_TIMEOUT_S:.0f} s",
                vm=self.vm,
                host=self.source,
            )
        return stats

    async def verify_destination(self) -> None:
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        while True:
            info = await self._call(self._dst, "verify destination", lambda c: c.vm(self.vm))
            if info.state == "running":
                with_events = await self._call(
                    self._dst, "verify destination", lambda c: c.migration(self.vm)
                )
                self.destination_events = with_events.events
                return
            if info.state in ("stopped", "crashed") or time.monotonic() > deadline:
                raise StepError(
                    "verify destination",
                    f"destination QEMU is {info.state} ({info.qemu_status})",
                    vm=self.vm,
                    host=self.destination,
                )
            await asyncio.sleep(0.02)

    async def announce(self) -> None:
        await self._call(self._dst, "announce", lambda c: c.announce(self.vm))

    async def stop_source(self) -> None:
        await self._call(self._src, "stop source", lambda c: c.release(self.vm))

    async def update_inventory(self) -> None:
        def update() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, self.vm)
                row.host = self.inventory.host_by_name(s, self.destination)
                row.state = "running"

        await asyncio.to_thread(update)

    async def rollback(self, cancel_migration: bool, teardown_destination: bool) -> None:
        """Before switchover: stop QEMU's migration, remove the destination, keep the source."""
        problems = []
        before = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
        if before.status == "completed":
            raise SwitchedOver("the source reports the migration completed")
        if cancel_migration:
            try:
                await self._call(self._src, "rollback", lambda c: c.cancel_migration(self.vm))
                await self._wait_source_settled()
            except StepError as exc:
                problems.append(str(exc))
        if teardown_destination:
            try:
                await self._call(self._dst, "rollback", lambda c: _delete(c, self.vm))
            except StepError as exc:
                problems.append(str(exc))
        try:
            status = await self._call(self._src, "rollback", lambda c: c.resume(self.vm))
            if status != "running":
                problems.append(f"source QEMU is {status} after rollback")
        except StepError as exc:
            problems.append(str(exc))
        if problems:
            raise StepError("rollback", "; ".join(problems), vm=self.vm)

    async def _wait_source_settled(self) -> None:
        for _ in range(200):
            stats = await self._call(self._src, "rollback", lambda c: c.migration(self.vm))
            if stats.status in ("cancelled", "failed", "completed", "none"):
                if stats.status == "completed":
                    raise StepError(
                        "rollback",
                        "the migration completed before it could be cancelled",
                        vm=self.vm,
                    )
                return
            await asyncio.sleep(0.05)

    async def recover(self) -> None:
        """After switchover the destination does not run: remove it, then resume the source.

        If the destination cannot be reached its QEMU might still run; resuming the source
        then risks two copies, so that is refused and left to the operator.
        """
        await self._call(self._dst, "recover", lambda c: _delete(c, self.vm))
        status = await self._call(
            self._src, "recover", lambda c: c.resume(self.vm, after_failed_switchover=True)
        )
        if status != "running":
            raise StepError("recover", f"source QEMU is {status}", vm=self.vm)


def _delete(client: AgentClient, vm: str) -> None:
    with contextlib.suppress(NotFound):
        client.delete(vm, force=True)
