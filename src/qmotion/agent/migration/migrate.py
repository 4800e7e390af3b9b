"""The agent's half of a live migration: incoming on the destination, outgoing on the source.

The manager drives the sequence; the agent does what must be fast or local. ``Migrations`` is
the facade the agent's routes call: it wires the two sides (``dst``: ``incoming``, ``src``:
``outgoing``, each named for the end that runs it, as libvirt's Src and Dst steps are; the
destination's Finish is ``dst.finish``, the source's Confirm ``confirm``) and the dirty-rate
sampling, and holds only what is neither side's. A call that names a migration (the manager's
id) acts on that migration only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import AgentError
from qmotion.agent.migration.confirm import SourceConfirm
from qmotion.agent.migration.dirty import DirtyRates
from qmotion.agent.migration.incoming import IncomingMigrations
from qmotion.agent.migration.outgoing import OutgoingMigrations
from qmotion.agent.migration.peer import PeerConnector, PeerTransport
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms.manager import VmManager
from qmotion.api.migration import (
    DirtyRateReport,
    IncomingRequest,
    IncomingResponse,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PostcopyRecovery,
    SteerRequest,
)
from qmotion.api.vm import VmInfo
from qmotion.hypervisor.errors import HypervisorError

log = logging.getLogger(__name__)
SETTLE_S = 15.0  # one VM's settling at agent start, at most: the next VMs' must follow


class Migrations:
    """Both ends of the migrations of this host's VMs, and their dirty rates.

    ``peer_transport`` (given the destination agent's URL) replaces the network of the
    switchover call, for tests."""

    def __init__(
        self,
        vms: VmManager,
        tls: TlsStore | None = None,
        peer_transport: PeerTransport | None = None,
    ) -> None:
        self.vms = vms
        self.nbd = NbdMirrors(vms, tls)
        incoming_disks = IncomingDisks(vms)
        self.dst = IncomingMigrations(vms, incoming_disks, tls)
        self.src = OutgoingMigrations(
            vms, self.nbd, incoming_disks, PeerConnector(tls, peer_transport), self.dst.events, tls
        )
        self.confirm = SourceConfirm(vms, self.nbd, incoming_disks, self.src.went_postcopy)
        self.dirty = DirtyRates(vms, self.src.migrating)

    async def settle_after_restart(self) -> None:
        """At agent start. A VM that resumed here while the agent was away owns its disks; a
        paused destination told to run whose stream completed meanwhile runs. A source left
        at pre-switchover (only this agent's watcher lets it go on, and it died) is
        cancelled: the guest resumes here, the manager rolls back; one in its device state
        is guarded again."""
        for name in self.vms.names():
            try:
                await asyncio.wait_for(self._settle(name), SETTLE_S)
            except (AgentError, HypervisorError, TimeoutError) as exc:
                log.error("%s not settled after the agent's restart: %s", name, exc)

    async def _settle(self, name: str) -> None:
        with contextlib.suppress(AgentError):  # not running: nothing to settle
            mon = self.vms.monitor(name)
            await self.dst.settle_after_restart(name, mon)
            await self.src.settle_after_restart(name, mon)

    # ------------------------------------------------------------------ destination

    async def incoming(self, req: IncomingRequest) -> IncomingResponse:
        return await self.dst.incoming(req)

    async def check_incoming(self, req: IncomingRequest) -> None:
        await self.dst.check_incoming(req)

    async def steer(self, name: str, req: SteerRequest) -> float:
        return await self.dst.steer(name, req)

    async def keep_disks(self, name: str, migration: str | None = None) -> None:
        await self.dst.finish.keep_disks(name, migration)

    async def finish(self, name: str, migration: str, wait_ms: int = 0) -> VmInfo:
        return await self.dst.finish.finish(name, migration, wait_ms)

    async def recover_incoming(
        self, name: str, req: PostcopyRecovery | None = None
    ) -> PostcopyRecovery:
        return await self.dst.recover_incoming(name, req)

    # ------------------------------------------------------------------ source

    async def outgoing(self, name: str, req: OutgoingRequest) -> MigrationStats:
        return await self.src.outgoing(name, req)

    async def stats(
        self, name: str, wait_ms: int, known: str | None, migration: str | None = None
    ) -> MigrationStats:
        return await self.src.stats(name, wait_ms, known, migration)

    def migrating(self, name: str) -> bool:
        return self.src.migrating(name)

    async def tune(self, name: str, tune: MigrationTune) -> MigrationStats:
        return await self.src.tune(name, tune)

    async def cancel(self, name: str, migration: str | None = None) -> MigrationStats:
        return await self.src.cancel(name, migration)

    async def reconnect_outgoing(self, name: str, req: PostcopyRecovery) -> MigrationStats:
        return await self.src.reconnect_outgoing(name, req)

    async def release(self, name: str, migration: str | None = None) -> None:
        await self.confirm.release(name, migration)
        await self._forget(name)

    async def resume(
        self, name: str, after_failed_switchover: bool = False, migration: str | None = None
    ) -> str:
        return await self.confirm.resume(name, after_failed_switchover, migration)

    # ------------------------------------------------------------------ either end

    def in_flight(self) -> tuple[list[str], list[str]]:
        """The VMs migrating out of this host now, and those coming in."""
        return [n for n in self.vms.names() if self.src.migrating(n)], self.dst.receiving()

    async def delete(
        self,
        name: str,
        *,
        force: bool = False,
        with_disks: bool = False,
        migration: str | None = None,
    ) -> None:
        """Delete the VM; with ``migration``, only as that migration's failed destination."""
        if migration is None:
            await self.vms.delete(name, force=force, with_disks=with_disks)
        else:
            await self.dst.finish.teardown(name, migration, force=force, with_disks=with_disks)
        await self._forget(name)

    async def _forget(self, name: str) -> None:
        self.src.forget(name)
        await self.dst.forget(name)

    async def announce(self, name: str) -> None:
        """QEMU's own announce (RARP from every NIC), for a VM running here."""
        mon = self.vms.monitor(name)
        await mon.execute(
            "announce-self",
            {
                "initial": 50,
                "max": 550,
                "rounds": 5,
                "step": 100,
            },
        )

    async def sample_dirty_rate(self, name: str, seconds: float) -> float | None:
        return await self.dirty.sample_dirty_rate(name, seconds)

    async def dirty_rate(self, name: str, seconds: list[float]) -> DirtyRateReport:
        return await self.dirty.dirty_rate(name, seconds)
