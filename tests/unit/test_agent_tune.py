"""The agent wakes a throttle as QEMU applies it: a throttle already running (the dormant 1 %
fired) ignores a new initial value and only steps by the increment, so the agent makes the first
step reach the wanted value and then restores the usual step. A scripted QMP stand-in that
throttles as QEMU's mig_throttle_guest_down does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from qmotion.agent.migration.migrate import Migrations
from qmotion.agent.migration.outgoing import Outgoing
from qmotion.agent.vms.migration_record import MigrationRecords
from qmotion.api.migration import MigrationTune
from qmotion.migration.convergence import MAX_THROTTLE, THROTTLE_INCREMENT


class ScriptedQemu:
    def __init__(self, throttle: int) -> None:
        self.throttle = throttle
        self.params: dict[str, Any] = {
            "cpu-throttle-initial": 1,
            "cpu-throttle-increment": 1,
            "max-cpu-throttle": 1,
        }

    def trigger(self) -> None:
        """QEMU after two syncs that dirtied too much."""
        p = self.params
        if self.throttle == 0:
            self.throttle = p["cpu-throttle-initial"]
        else:
            self.throttle = min(self.throttle + p["cpu-throttle-increment"], p["max-cpu-throttle"])

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if command == "migrate-set-parameters":
            assert args is not None
            self.params.update(args)
            return {}
        assert command == "query-migrate"
        return {"status": "active", "cpu-throttle-percentage": self.throttle, "ram": {}}


class OneVm:
    def __init__(self, qemu: ScriptedQemu) -> None:
        self.qemu = qemu
        self.records = MigrationRecords(Path("/nonexistent"))  # no VM directory: no record

    def monitor(self, name: str) -> ScriptedQemu:
        return self.qemu


def _wake(throttle_before: int, wanted: int) -> tuple[ScriptedQemu, list[int]]:
    qemu = ScriptedQemu(throttle_before)
    migrations = Migrations(OneVm(qemu))  # type: ignore[arg-type]
    migrations.src._outgoing["vm1"] = Outgoing(started_at=time.monotonic(), status="active")

    async def run() -> list[int]:
        await migrations.tune("vm1", MigrationTune(throttle_pct=wanted))
        seen = []
        for _ in range(3):
            qemu.trigger()
            seen.append((await migrations.stats("vm1", 0, None)).throttle_pct)
        return seen

    return qemu, asyncio.run(run())


def test_a_throttle_not_yet_running_starts_at_the_wanted_value() -> None:
    qemu, seen = _wake(0, 60)
    assert seen == [60, 80, MAX_THROTTLE]
    assert qemu.params["cpu-throttle-increment"] == THROTTLE_INCREMENT


def test_a_dormant_throttle_that_fired_steps_straight_to_the_wanted_value() -> None:
    qemu, seen = _wake(1, 60)
    assert seen[0] == 60, seen  # not 1 + 20
    assert seen[1:] == [80, MAX_THROTTLE]  # then QEMU's usual step again
    assert qemu.params["cpu-throttle-increment"] == THROTTLE_INCREMENT
