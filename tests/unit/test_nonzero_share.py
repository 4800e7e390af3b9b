"""The agent's estimate of what a huge-page-backed guest's first pass sends: the share of its
pages that are not zero, read with HMP ``xp`` through a scripted monitor."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qmotion.agent.migration.dirty import _nonzero_share
from qmotion.hypervisor.errors import HypervisorError


class ScriptedMonitor:
    """Answers ``xp /4gx ADDR`` like QEMU's HMP: pages below ``written`` hold data."""

    def __init__(self, written: int, fail: bool = False) -> None:
        self.written, self.fail, self.calls = written, fail, 0

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        assert command == "human-monitor-command" and args is not None
        self.calls += 1
        if self.fail:
            raise HypervisorError("xp: not supported")
        addr = int(args["command-line"].split()[-1])
        word = "0x5a5a5a5a5a5a5a5a" if addr < self.written else "0x0000000000000000"
        return f"{addr:016x}: {word} {word}\n{addr + 16:016x}: {word} {word}\n"


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6, 1.0])
def test_the_share_of_written_pages_is_estimated(share: float) -> None:
    memory = 1 << 30
    mon = ScriptedMonitor(int(memory * share))
    got = asyncio.run(_nonzero_share(mon, memory))  # type: ignore[arg-type]
    assert got is not None and got == pytest.approx(share, abs=0.08)
    assert mon.calls <= 256


def test_an_unreadable_guest_gives_no_estimate() -> None:
    assert asyncio.run(_nonzero_share(ScriptedMonitor(0, fail=True), 1 << 30)) is None  # type: ignore[arg-type]
