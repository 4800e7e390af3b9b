"""Dirty-rate sampling: how fast a guest writes its memory, measured with QMP calc-dirty-rate.

The manager asks before a migration (its prediction); the agent samples every running guest
for DRS on its own. Both take turns per VM, and the periodic sample leaves alone a VM whose
outgoing migration is under way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

from qmotion.agent.errors import OperationFailed
from qmotion.agent.vms.manager import VmManager
from qmotion.api.migration import DirtyRateReport, DirtyRateSample
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

SAMPLE_PAGES = 2048  # per GiB: QEMU's 512 leaves a 100 MiB/s sweep with +-15 % noise


def _rss_bytes(pid: int) -> int:
    """QEMU's resident memory: an upper bound on the guest RAM a first pass sends."""
    # Huge pages are not in VmRSS: a guest backed by them shows only QEMU's own memory there.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.partition(":")[::2] for line in status.splitlines())
        return sum(
            int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "HugetlbPages") if k in fields
        )
    except (OSError, ValueError, IndexError):
        return 1 << 62


NONZERO_SAMPLES = 256
NONZERO_BUDGET_S = 0.25
LOW_RAM_END = 2 << 30  # RAM on every pc and q35 layout (q35 puts its PCI hole at 2 GiB)


async def _nonzero_share(mon: Monitor, memory: int) -> float | None:
    """The share of guest pages whose first 32 bytes are not all zero (QEMU sends zero pages
    as a flag), from random pages read with HMP ``xp``; None if it cannot be read."""
    span = min(memory, LOW_RAM_END) // 4096
    if span < 256:
        return None
    rng = random.Random(span)
    deadline = time.monotonic() + NONZERO_BUDGET_S
    seen = nonzero = 0
    while seen < NONZERO_SAMPLES and time.monotonic() < deadline:
        addr = rng.randrange(256, span) * 4096  # above the first MiB (BIOS, VGA)
        try:
            out = await mon.execute("human-monitor-command", {"command-line": f"xp /4gx {addr}"})
        except HypervisorError:
            return None
        words = [w for line in str(out).splitlines() for w in line.split(":", 1)[-1].split()]
        seen += 1
        nonzero += any(int(w, 16) for w in words if w.startswith("0x"))
    return nonzero / seen if seen >= 32 else None


class DirtyRates:
    """The dirty-rate measurements of the VMs here, one at a time per VM; ``migrating`` says
    whether a VM's outgoing migration is under way."""

    def __init__(self, vms: VmManager, migrating: Callable[[str], bool]) -> None:
        self.vms = vms
        self._migrating = migrating
        self._locks: dict[str, asyncio.Lock] = {}

    async def sample_dirty_rate(self, name: str, seconds: float) -> float | None:
        """One page-sampling measurement (MiB/s) for DRS, unless a migration of ``name`` is
        under way (checked again once the VM's turn comes): None then."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self._migrating(name):
                return None
            try:
                sample = await self._one_sample(name, self.vms.monitor(name), seconds)
            except HypervisorError as exc:
                raise OperationFailed.of(
                    exc, vm=name, what=f"measuring the dirty rate of {name}"
                ) from exc
        return sample.dirtied_bytes / sample.seconds / (1 << 20)

    async def dirty_rate(self, name: str, seconds: list[float]) -> DirtyRateReport:
        # QEMU runs one measurement at a time and keeps one result: callers take turns.
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                return await self._dirty_rate(name, seconds)
            except HypervisorError as exc:
                raise OperationFailed.of(
                    exc, vm=name, what=f"measuring the dirty rate of {name}"
                ) from exc

    async def _dirty_rate(self, name: str, seconds: list[float]) -> DirtyRateReport:
        """QMP calc-dirty-rate (page sampling) once per length in ``seconds``, in order.

        Two lengths tell a hot set (found dirty in the short sample already, no more in the
        long one) from a sweep over new pages (dirty bytes growing with the length).
        """
        mon = self.vms.monitor(name)
        spec = self.vms.spec(name)
        memory = spec.memory << 20
        rt = self.vms.runtime(name)
        resident = _rss_bytes(rt.pid) if rt is not None else memory
        share: asyncio.Future[float | None] | None = None
        if rt is not None and rt.memory_backing != "anonymous":
            # A huge-page pool is resident in full from the start: what the first pass will
            # send is the share of pages that are not zero, read while QEMU samples (QEMU's
            # calc-dirty-rate runs in its own thread; the monitor is free meanwhile).
            share = asyncio.ensure_future(_nonzero_share(mon, memory))
        samples = []
        try:
            for length in seconds:
                samples.append(await self._one_sample(name, mon, length))
        finally:
            got = await share if share is not None else None
        if got is not None:
            resident = int(memory * got)
        return DirtyRateReport(
            samples=samples, memory_bytes=memory, resident_bytes=min(resident, memory)
        )

    async def _one_sample(self, name: str, mon: Monitor, length: float) -> DirtyRateSample:
        ms = max(int(length * 1000), 100)
        await mon.execute(
            "calc-dirty-rate",
            {"calc-time": ms, "calc-time-unit": "millisecond", "sample-pages": SAMPLE_PAGES},
        )
        deadline = time.monotonic() + ms / 1000 + 10
        await asyncio.sleep(ms / 1000)
        while True:
            info = await mon.execute("query-dirty-rate")
            if info.get("status") == "measured":
                break
            if time.monotonic() > deadline:
                raise OperationFailed(f"calc-dirty-rate of {name} did not finish", vm=name)
            await asyncio.sleep(0.02)
        # QEMU reports MiB/s over the sampled time (its "MB" is 2^20 bytes).
        rate = float(info.get("dirty-rate", 0)) * (1 << 20)
        return DirtyRateSample(seconds=ms / 1000, dirtied_bytes=int(rate * ms / 1000))
