"""The manager's side of cold migration (a stopped VM): pre-checks and the port to the agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from qmotion.api.storage import DiskCopy, DiskCopyRequest, DiskExport, DiskFormat
from qmotion.api.vm import Disk, VmSpec
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError, NotFound
from qmotion.migration.cold import ColdPortError
from qmotion.migration.prechecks import Refusal
from qmotion.server.db import Database, Host
from qmotion.server.inventory import Inventory

T = TypeVar("T")
# What a live migration's pre-checks refuse that does not matter for a stopped VM: it does
# not run (memory, TCG dirty tracking, migration network MTU, TLS of a migration stream).
COLD_APPLIES = {
    "vm_attention",
    "already_migrating",
    "same_host",
    "unknown_host",
    "host_unavailable",
    "cpu_model_unsupported",
    "machine_type_unavailable",
    "bridge_missing",
    "datastore_unreachable",
}
CALL_TIMEOUT_S = 60.0
COPY_TIMEOUT_S = 6 * 3600.0  # one disk's copy and verification


def cold_refusals(
    live: list[Refusal],
    datastore: str | None,
    current_datastores: frozenset[str],
    target_datastores: frozenset[str],
    target: str,
    not_shared: frozenset[str] = frozenset(),
) -> list[Refusal]:
    """The live pre-checks that apply to a stopped VM, plus the datastore it is copied to.
    ``not_shared``: the VM's datastores that are not marked shared on both hosts (a local
    datastore of the same name elsewhere is other storage: without a copy the VM would find
    no disk there)."""
    out = [
        r
        for r in live
        if r.code in COLD_APPLIES and not (datastore and r.code == "datastore_unreachable")
    ]
    if datastore is None:
        # The unreachable ones are refused already (by the live pre-checks).
        for ds in sorted(not_shared & target_datastores):
            out.append(
                Refusal(
                    "datastore_not_shared",
                    f"datastore {ds} is not shared between the two hosts: its files would not "
                    f"be there on {target} (--datastore DS copies the disks)",
                    409,
                    field="datastore",
                    host=target,
                )
            )
    if datastore is not None and datastore in current_datastores:
        out.append(
            Refusal(
                "same_datastore",
                f"the disks are on datastore {datastore} already: without --datastore only "
                "the definition moves",
                422,
                field="datastore",
            )
        )
    if datastore is not None and datastore not in target_datastores:
        known = ", ".join(sorted(target_datastores)) or "none"
        out.append(
            Refusal(
                "datastore_unreachable",
                f"datastore {datastore} is not reachable from {target} (it reaches: {known})",
                422,
                field="datastore",
                host=target,
            )
        )
    return out


class AgentColdPort:
    """One cold migration of ``vm``: each call is one agent request."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        spec: VmSpec,
        source: Host,
        destination: Host,
        datastore: str | None,
        disk_format: DiskFormat | None,
    ) -> None:
        self.db, self.inventory, self.spec = db, inventory, spec
        self.source, self.destination = source, destination
        self.datastore, self.disk_format = datastore, disk_format
        self.exports: list[DiskExport] = []
        self.made: list[Disk] = []  # copies made by this port (to remove on rollback)

    async def _call(self, host: Host, fn: Callable[[AgentClient], T], timeout_s: float) -> T:
        def work() -> T:
            with self.inventory.agents.client(host.agent_url, host.token, timeout_s) as client:
                return fn(client)

        try:
            return await asyncio.to_thread(work)
        except ApiError as exc:
            raise ColdPortError(f"host {host.name}: {exc}", refused=exc.status < 500) from exc
        except ClientError as exc:
            raise ColdPortError(f"host {host.name}: {exc}") from exc

    def _targets(self) -> list[Disk]:
        """Where each disk's copy goes: the datastore asked for, the VM's folder there. A
        suspended VM's saved state is copied too, last, as it is (raw)."""
        assert self.datastore is not None
        out = []
        for i, d in enumerate(self.spec.disks):
            fmt = self.disk_format or d.format
            out.append(
                Disk(
                    datastore=self.datastore,
                    path=f"{self.spec.name}/disk{i}.{fmt}",
                    format=fmt,
                    bootable=d.bootable,
                )
            )
        if self.spec.saved_state is not None:
            name = self.spec.saved_state.path.rsplit("/", 1)[-1]
            out.append(
                Disk(datastore=self.datastore, path=f"{self.spec.name}/{name}", format="raw")
            )
        return out

    async def export(self, copying: bool) -> None:
        name = self.spec.name
        self.exports = await self._call(
            self.source,
            lambda c: c.export_disks(name, copy=copying, reader=self.destination.name),
            CALL_TIMEOUT_S,
        )

    async def copy(self) -> tuple[Disk, ...]:
        if not self.exports:  # a retried copy after a restart: the exports are idempotent
            await self.export(True)
        made = []
        for exp, target in zip(self.exports, self._targets(), strict=True):
            req = DiskCopyRequest(
                uri=exp.uri,
                datastore=target.datastore,
                path=target.path,
                format=target.format,
                tls=exp.tls,
            )
            # A copy that fails is removed by the destination itself; one refused because
            # the file exists is not ours: only finished copies are ever removed here.
            got = await self._call(self.destination, _copier(req), COPY_TIMEOUT_S)
            self.made.append(got.disk)
            made.append(got.disk.model_copy(update={"bootable": target.bootable}))
        name = self.spec.name
        with contextlib.suppress(ColdPortError):  # the exports end (the hold stays)
            await self._call(
                self.source, lambda c: c.unexport_disks(name, release=False), CALL_TIMEOUT_S
            )
        return tuple(made)

    def _destination_spec(self, disks: tuple[Disk, ...]) -> VmSpec:
        spec = self.spec
        if disks:
            saved = None
            if spec.saved_state is not None:
                disks, saved = disks[:-1], disks[-1]
            spec = spec.model_copy(update={"disks": list(disks), "saved_state": saved})
        # Every disk exists already (copied, or shared): never created there. A disk the
        # destination does not find is a refusal, not a new empty image.
        return spec.model_copy(
            update={
                "disks": [
                    d.model_copy(update={"create_size": None, "create_from": None})
                    for d in spec.disks
                ]
            }
        )

    def _moved(self) -> bool:
        """The inventory has the VM on the destination (a define and commit done before)."""
        with self.db.session() as s:
            return self.inventory.vm_by_name(s, self.spec.name).host.name == self.destination.name

    async def define(self, disks: tuple[Disk, ...]) -> None:
        if await asyncio.to_thread(self._moved):
            return  # done by a call (before a manager restart) whose step was not recorded
        spec = self._destination_spec(disks)

        def define(c: AgentClient) -> None:
            try:
                c.define(spec)
            except ApiError as exc:
                # Defined already by an earlier call whose answer was lost: the same VM on the
                # same files, done. Anything else there is not ours to take.
                there = c.vm(spec.name).spec if exc.status == 409 else None
                if there is None or there.model_dump() != spec.model_dump():
                    raise

        await self._call(self.destination, define, CALL_TIMEOUT_S)

        def commit() -> None:
            with self.db.session() as s:
                row = self.inventory.vm_by_name(s, spec.name)
                row.host = self.inventory.host_by_name(s, self.destination.name)
                row.spec = spec.model_dump(mode="json")

        await asyncio.to_thread(commit)

    async def cleanup(self, copied: bool) -> tuple[str, ...]:
        name = self.spec.name

        def forget(c: AgentClient) -> None:
            # The delete ends the exports and removes the VM's directory (its hold with it):
            # until it succeeds the old definition stays held, never startable.
            with contextlib.suppress(NotFound):  # forgotten by a call whose answer was lost
                c.delete(name, with_disks=copied)

        await self._call(self.source, forget, CALL_TIMEOUT_S)
        return ()

    async def abort(self) -> None:
        name = self.spec.name

        def unexport(c: AgentClient) -> None:
            with contextlib.suppress(NotFound):
                c.unexport_disks(name)

        def undefine(c: AgentClient) -> None:
            """A definition whose answer was lost (the inventory never moved): ours if it
            is this VM on these files, and stopped; removed without its disks."""
            try:
                info = c.vm(name)
            except NotFound:
                return
            if info.spec.uuid == self.spec.uuid and info.state in ("stopped", "suspended"):
                c.delete(name)

        if await asyncio.to_thread(self._moved):
            # The inventory moved the VM: it is the destination's; nothing there is undone.
            raise ColdPortError("the VM was moved to the destination already", moved=True)
        # Each part on its own: the source is released even when the destination is the
        # reason for the rollback (and does not answer).
        errors = []
        for host, fn in [
            (self.source, unexport),
            (self.destination, undefine),
            *((self.destination, _remover(t)) for t in self.made),
        ]:
            try:
                await self._call(host, fn, CALL_TIMEOUT_S)
            except ColdPortError as exc:
                errors.append(str(exc))
        if errors:
            raise ColdPortError("; ".join(errors))


def _copier(req: DiskCopyRequest) -> Callable[[AgentClient], DiskCopy]:
    return lambda c: c.copy_disk(req)


def _remover(disk: Disk) -> Callable[[AgentClient], None]:
    return lambda c: c.remove_disk_copy(disk.datastore, disk.path)
