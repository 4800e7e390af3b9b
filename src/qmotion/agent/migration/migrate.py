"""The agent's half of a live migration: incoming on the destination, outgoing on the source.

The manager drives the sequence; the agent does what must be fast or local. ``Migrations`` is
the facade the agent's routes call: it wires the two sides (``dst``: ``incoming``, ``src``:
``outgoing``, each named for the end that runs it, as libvirt's Src and Dst steps are) and the
dirty-rate sampling, and holds only what is neither side's.
"""

from __future__ import annotations

import contextlib

from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import AgentError
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
from qmotion.hypervisor.errors import HypervisorError


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
        self.dirty = DirtyRates(vms, self.src.migrating)

    async def settle_after_restart(self) -> None:
        """At agent start. A VM that resumed here while the agent was away owns its disks.
        A source left at pre-switchover (only this agent's watcher lets it go on, and it died)
        is cancelled: the guest resumes here, the manager rolls back."""
        for name in self.vms.names():
            with contextlib.suppress(AgentError, HypervisorError):
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

    async def keep_disks(self, name: str) -> None:
        await self.dst.keep_disks(name)

    async def recover_incoming(
        self, name: str, req: PostcopyRecovery | None = None
    ) -> PostcopyRecovery:
        return await self.dst.recover_incoming(name, req)

    # ------------------------------------------------------------------ source

    async def outgoing(self, name: str, req: OutgoingRequest) -> MigrationStats:
        return await self.src.outgoing(name, req)

    async def stats(self, name: str, wait_ms: int, known: str | None) -> MigrationStats:
        return await self.src.stats(name, wait_ms, known)

    def migrating(self, name: str) -> bool:
        return self.src.migrating(name)

    async def tune(self, name: str, tune: MigrationTune) -> MigrationStats:
        return await self.src.tune(name, tune)

    async def cancel(self, name: str) -> MigrationStats:
        return await self.src.cancel(name)

    async def reconnect_outgoing(self, name: str, req: PostcopyRecovery) -> MigrationStats:
        return await self.src.reconnect_outgoing(name, req)

    async def release(self, name: str) -> None:
        await self.src.release(name)

    async def resume(self, name: str, after_failed_switchover: bool = False) -> str:
        return await self.src.resume(name, after_failed_switchover)

    # ------------------------------------------------------------------ either end

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
