"""The agent's periodic dirty-rate sampling for DRS: which guests it measures, and when not."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from qmotion.agent.app import sample_dirty_rates
from qmotion.agent.errors import Conflict
from qmotion.hypervisor.errors import QmpError


@dataclass
class Host:
    """VM name -> (QEMU status, migrating, dirty rate or an error to raise)."""

    vms: dict[str, tuple[str, bool, float | Exception]]
    measured: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return list(self.vms)

    def migrating(self, name: str) -> bool:
        return self.vms[name][1]

    async def status(self, name: str) -> str:
        return self.vms[name][0]

    async def measure(self, name: str) -> float:
        self.measured.append(name)
        rate = self.vms[name][2]
        if isinstance(rate, Exception):
            raise rate
        return rate


def test_only_running_guests_not_migrating_are_measured() -> None:
    host = Host(
        {
            "busy": ("running", False, 80.0),
            "leaving": ("running", True, 5.0),  # its migration's dirty tracking: hands off
            "arriving": ("inmigrate", False, 5.0),
            "paused": ("paused", False, 5.0),
            "flaky": ("running", False, QmpError("calc-dirty-rate", "GenericError", "busy")),
            "stopped-now": ("running", False, Conflict("VM stopped-now is not running")),
        }
    )
    rates = {"gone": 3.0, "flaky": 7.0}
    asyncio.run(sample_dirty_rates(host, rates))
    assert host.measured == ["busy", "flaky", "stopped-now"]
    # A failed measurement keeps the last one; a VM no longer here is forgotten.
    assert rates == {"busy": 80.0, "flaky": 7.0}
