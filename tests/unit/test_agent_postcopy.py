"""The agent's side of postcopy, over a scripted QMP stand-in that refuses what QEMU 10.0
refuses: a source in postcopy is never cancelled or resumed, and a destination whose main loop
is blocked (a vCPU or device waiting on a page) is recovered with out-of-band commands only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from qmotion.agent.errors import Conflict, InPostcopy, MigratedAway
from qmotion.agent.migration.migrate import Migrations
from qmotion.agent.migration.outgoing import Outgoing
from qmotion.agent.vms.migration_record import MigrationRecords
from qmotion.api.migration import PostcopyRecovery
from qmotion.hypervisor.errors import QmpError

OOB = {"migrate-pause", "migrate-recover", "yank"}  # 'allow-oob': true in qapi/migration.json


class ScriptedQemu:
    def __init__(self, status: str, *, main_loop_blocked: bool = False) -> None:
        self.migration = status
        # The source's run state: stopped for the switchover (postcopy), gone after it.
        self.run_state = "postmigrate" if status == "completed" else "finish-migrate"
        self.blocked = main_loop_blocked
        self.commands: list[str] = []
        self.listening: str | None = None

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        if oob and command not in OOB:
            raise QmpError(command, "GenericError", f"{command} does not allow out-of-band")
        if self.blocked and not oob:
            await asyncio.sleep(3600)  # the main loop waits on a page that does not come
        self.commands.append(command)
        if command == "query-migrate":
            return {"status": self.migration}
        if command == "query-status":
            return {"status": self.run_state}
        if command == "migrate-pause":
            if self.migration != "postcopy-active":
                raise QmpError(command, "GenericError", "only during postcopy-active")
            self.migration = "postcopy-paused"
            return {}
        if command == "migrate-recover":
            if self.migration != "postcopy-paused":
                raise QmpError(command, "GenericError", "only when postcopy is paused")
            assert args is not None
            self.listening = str(args["uri"])
            return {}
        if command == "yank":
            if self.migration == "postcopy-recover-setup":
                self.migration = "postcopy-paused"
            return {}
        if command == "migrate":
            assert args is not None and args.get("resume") is True
            assert self.migration == "postcopy-paused", "QEMU resumes only a paused postcopy"
            self.migration = "postcopy-recover"
            return {}
        if command in ("migrate_cancel", "cont"):
            return {}
        raise AssertionError(f"unexpected {command}")

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])


class OneVm:
    def __init__(self, qemu: ScriptedQemu) -> None:
        self.qemu = qemu
        self.records = MigrationRecords(Path("/nonexistent"))  # no VM directory: no record

    def monitor(self, name: str) -> ScriptedQemu:
        return self.qemu


def _source(status: str, events: list[str]) -> tuple[Migrations, ScriptedQemu]:
    qemu = ScriptedQemu(status)
    m = Migrations(OneVm(qemu))  # type: ignore[arg-type]
    m.src._outgoing["vm1"] = Outgoing(
        started_at=time.monotonic(), status=status, events=[(e, 0.0) for e in events]
    )
    return m, qemu


@pytest.mark.parametrize("status", ["postcopy-active", "postcopy-paused", "postcopy-recover"])
def test_a_source_in_postcopy_is_never_cancelled_or_resumed(status: str) -> None:
    m, qemu = _source(status, ["active", status])
    with pytest.raises(InPostcopy):
        asyncio.run(m.cancel("vm1"))
    with pytest.raises(InPostcopy):
        asyncio.run(m.resume("vm1", after_failed_switchover=True))
    assert "migrate_cancel" not in qemu.commands and "cont" not in qemu.commands


def test_a_source_that_completed_through_postcopy_is_not_resumed_even_after_a_failed_verify() -> (
    None
):
    m, qemu = _source("completed", ["active", "postcopy-active", "completed"])
    with pytest.raises(MigratedAway):
        asyncio.run(m.resume("vm1", after_failed_switchover=True))
    assert "cont" not in qemu.commands


def test_a_blocked_destination_is_recovered_out_of_band() -> None:
    qemu = ScriptedQemu("postcopy-active", main_loop_blocked=True)
    m = Migrations(OneVm(qemu))  # type: ignore[arg-type]
    m.dst._incoming_uri["vm1"] = "tcp:198.19.1.12:40000"

    async def run() -> str | None:
        got = await asyncio.wait_for(m.recover_incoming("vm1"), timeout=5)
        return got.uri

    assert asyncio.run(run()) == "tcp:198.19.1.12:40000"
    assert qemu.commands == ["migrate-pause", "yank", "migrate-recover"]
    assert qemu.listening == "tcp:198.19.1.12:40000"


@pytest.mark.parametrize("resumed", [False, True])
def test_a_destination_still_loading_its_devices_is_not_paused(resumed: bool) -> None:
    """Pausing the stream before the destination resumed ends it (QEMU 10.0 exits with
    "loadvm failed"): refused, nothing sent to QEMU; after the resume it is recovered."""
    qemu = ScriptedQemu("postcopy-active", main_loop_blocked=True)
    m = Migrations(OneVm(qemu))  # type: ignore[arg-type]
    m.dst._incoming_uri["vm1"] = "tcp:198.19.1.12:40000"
    m.dst._incoming_events["vm1"] = [("active", 1.0), ("postcopy-active", 2.0)]
    if resumed:
        m.dst._incoming_events["vm1"].append(("resumed", 3.0))
        asyncio.run(asyncio.wait_for(m.recover_incoming("vm1"), timeout=5))
        assert qemu.listening == "tcp:198.19.1.12:40000"
    else:
        with pytest.raises(Conflict, match="not resumed"):
            asyncio.run(asyncio.wait_for(m.recover_incoming("vm1"), timeout=5))
        assert qemu.commands == []


def test_a_destination_with_no_incoming_migration_refuses_recovery() -> None:
    m = Migrations(OneVm(ScriptedQemu("none")))  # type: ignore[arg-type]
    with pytest.raises(Conflict):
        asyncio.run(m.recover_incoming("vm1"))


def test_a_reconnection_stuck_in_its_setup_is_yanked_and_resumed() -> None:
    m, qemu = _source("postcopy-recover-setup", ["active", "postcopy-active"])
    asyncio.run(m.reconnect_outgoing("vm1", PostcopyRecovery(uri="tcp:198.19.1.12:40000")))
    assert "yank" in qemu.commands
    assert qemu.commands.index("migrate") > qemu.commands.index("yank"), qemu.commands


class SettingUp(ScriptedQemu):
    """A stream still in setup for its first ``queries`` query-migrate, active after (and
    cancelled once cancelled: a cancel in setup is what QEMU 10.0.2 aborts on)."""

    def __init__(self, queries: int) -> None:
        super().__init__("setup")
        self.left = queries
        self.cancelled_in: str | None = None

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        if command == "query-migrate" and self.migration == "setup":
            self.left -= 1
            if self.left < 0:
                self.migration = "active"
        if command == "migrate_cancel":
            self.cancelled_in = self.migration
            self.migration = "cancelled"
        return await super().execute(command, args, oob=oob)


def test_a_cancel_waits_for_the_stream_to_leave_setup() -> None:
    qemu = SettingUp(queries=4)
    m = Migrations(OneVm(qemu))  # type: ignore[arg-type]
    m.src._outgoing["vm1"] = Outgoing(started_at=time.monotonic(), status="setup")
    stats = asyncio.run(m.cancel("vm1"))
    assert qemu.cancelled_in == "active", qemu.commands
    assert stats.status == "cancelled"
