"""A shared-nothing live migration's disks: which are copied, and the source's mirror into
the destination's empty copies until every disk is in sync (``params.copy_datastore``)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

from qmotion.api.migration import UNLIMITED_BANDWIDTH, MigrationParams
from qmotion.api.storage import (
    CopyDisk,
    DiskCopyPlan,
    DiskUsage,
    MirrorStatus,
    NbdMirrorRequest,
    NbdTargets,
)
from qmotion.api.vm import VmSpec
from qmotion.migration.errors import StepError
from qmotion.migration.prechecks import copied_disks
from qmotion.server.tasks.ends import Ends
from qmotion.server.tasks.flight import FlightRecorder

MIRROR_POLL_S = 0.5
MIRROR_STALL_S = 60.0  # a disk copy that gains nothing this long is abandoned


def copy_plan(
    spec: VmSpec, params: MigrationParams, not_shared: frozenset[str], usage: list[DiskUsage]
) -> DiskCopyPlan:
    """The disks a shared-nothing migration copies and their sizes; ValueError when the
    source cannot say how large one is."""
    assert params.copy_datastore is not None
    sizes = {u.index: u for u in usage}
    disks = []
    for i in copied_disks(
        tuple(d.datastore for d in spec.disks), params.copy_datastore, not_shared
    ):
        u = sizes.get(i)
        if u is None or not u.virtual_size:
            raise ValueError(f"the size of disk {i} of {spec.name} is unknown")
        disks.append(
            CopyDisk(index=i, virtual_size=u.virtual_size, allocated_bytes=u.allocated_bytes or 0)
        )
    return DiskCopyPlan(datastore=params.copy_datastore, format=params.copy_format, disks=disks)


class SharedNothing:
    """The disk copy of one migration: what is copied (``plan``), where it goes
    (``targets``, the destination's exports) and how far it got (``status``). Its figures
    go to the flight record."""

    def __init__(self, vm: str, ends: Ends, flight: FlightRecorder) -> None:
        self.vm, self.ends, self.flight = vm, ends, flight
        self.plan: DiskCopyPlan | None = None
        self.targets: NbdTargets | None = None
        self.status: MirrorStatus | None = None
        self._started_at: float | None = None
        self._best = (-1, 0.0)  # least remaining bytes seen, and when

    @property
    def started(self) -> bool:
        return self._started_at is not None

    async def plan_copy(
        self, spec: VmSpec, params: MigrationParams, not_shared: frozenset[str]
    ) -> None:
        """Which disks a shared-nothing migration copies, with their sizes (the source's)."""
        assert params.copy_datastore is not None
        usage = await self.ends.source("prechecks", lambda c: c.disks(self.vm))
        try:
            self.plan = copy_plan(spec, params, not_shared, usage)
        except ValueError as exc:
            raise StepError("prechecks", str(exc), vm=self.vm) from exc

    def request(self, params: MigrationParams) -> NbdMirrorRequest:
        """What the source is asked to mirror, into the exports the destination prepared."""
        targets = self.targets
        if targets is None:
            raise StepError("mirror", "no destination disks to mirror into", vm=self.vm)
        capped = params.max_bandwidth < UNLIMITED_BANDWIDTH
        by_index = dict(enumerate(targets.disks))
        return NbdMirrorRequest(
            host=IPv4Address(targets.host),
            port=targets.port,
            exports=targets.exports,
            targets=[by_index[e.index] for e in targets.exports if e.index in by_index],
            tls=params.tls,
            tls_hostname=params.tls_hostname,
            speed=max(params.max_bandwidth // len(targets.exports), 1) if capped else None,
        )

    async def start(self, req: NbdMirrorRequest, now: float) -> None:
        """The source starts mirroring; ``now``: when the copy began."""
        status = await self.ends.source(
            "mirror", lambda c: c.disk_mirror(self.vm, req), timeout_s=60
        )
        self._seen(status)
        self._started_at = now
        self._best = (status.remaining_bytes, now)

    async def poll(self) -> None:
        """How far the source's mirror got, after a pause."""
        await asyncio.sleep(MIRROR_POLL_S)
        self._seen(
            await self.ends.source("mirror", lambda c: c.disk_mirror_status(self.vm), timeout_s=30)
        )

    def _seen(self, status: MirrorStatus) -> None:
        self.status = status
        self.flight.disk_bytes = status.total_bytes

    def synced(self, now: float) -> bool:
        """True once every disk is in sync and guest writes reach both copies; a copy that
        failed, or gained nothing for ``MIRROR_STALL_S`` until ``now``, is a step error that
        asking again cannot help."""
        st, started = self.status, self._started_at
        assert st is not None and started is not None
        if st.phase not in ("mirroring", "ready"):
            raise StepError(
                "mirror", f"the disk copy {st.phase}: {st.error}", vm=self.vm, retryable=False
            )
        if st.synced and all(d.actively_synced for d in st.disks):
            self.flight.disk_copy_ms = (now - started) * 1000
            return True
        best, since = self._best
        if st.remaining_bytes < best or st.rate_bps > 0:
            self._best = (min(st.remaining_bytes, best), now)
        elif now - since > MIRROR_STALL_S:
            raise StepError(
                "mirror",
                f"the disk copy gained nothing for {MIRROR_STALL_S:.0f} s "
                f"({st.remaining_bytes} bytes left)",
                vm=self.vm,
                host=self.ends.src.name,
                retryable=False,
            )
        return False

    async def stop(self) -> None:
        """The source stops copying into the destination (which is removed next, its new
        disks with it). A source that cannot say is not fatal: its mirror then fails on its
        own when the destination goes, and the next migration clears it."""
        try:
            await self.ends.source("rollback", lambda c: c.disk_mirror_abort(self.vm))
        except StepError as exc:
            self.flight.warnings.append(f"the source's disk mirror not stopped: {exc}")
