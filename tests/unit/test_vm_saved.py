"""A VM's state saved to a file over its monitor (qmotion.agent.vms.saved), against a scripted
monitor: the QMP sequence, and a failed save leaves the guest running and no file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from qmotion.agent.errors import Conflict, OperationFailed
from qmotion.agent.vms import saved
from qmotion.hypervisor.monitor import Monitor


class ScriptedMonitor:
    """Answers ``query-migrate`` from a script (its last answer repeats); records commands."""

    def __init__(self, statuses: list[str], caps: list[dict[str, Any]] | None = None) -> None:
        self.statuses = statuses
        self.caps = caps or []
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-migrate":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return {"status": status}
        if cmd == "query-migrate-capabilities":
            return self.caps
        return {}

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls if c != "query-migrate"]


def _save(mon: ScriptedMonitor, path: Path) -> None:
    asyncio.run(saved.save_state("v", cast(Monitor, mon), path))


def test_a_save_stops_the_guest_and_clears_what_a_file_cannot_take(tmp_path: Path) -> None:
    caps = [{"capability": "postcopy-ram", "state": True}, {"capability": "xbzrle", "state": False}]
    mon = ScriptedMonitor(["none", "active", "completed"], caps)
    _save(mon, tmp_path / "v.state")
    assert mon.commands() == [
        "stop",
        "query-migrate-capabilities",
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "migrate",
    ]
    args = dict(mon.calls)
    assert args["migrate-set-capabilities"] == {
        "capabilities": [{"capability": "postcopy-ram", "state": False}]
    }
    assert args["migrate-set-parameters"] == {"max-bandwidth": 1 << 40, "tls-creds": ""}
    assert args["migrate"] == {"uri": f"file:{tmp_path / 'v.state'}"}


def test_a_migrating_vm_is_refused_untouched(tmp_path: Path) -> None:
    mon = ScriptedMonitor(["postcopy-active"])
    with pytest.raises(Conflict):
        _save(mon, tmp_path / "v.state")
    assert mon.commands() == []


def test_a_failed_save_runs_the_guest_on_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "v.state"
    path.write_bytes(b"partial")
    mon = ScriptedMonitor(["none", "failed"])
    with pytest.raises(OperationFailed, match="it runs on, nothing saved"):
        _save(mon, path)
    assert mon.commands()[-2:] == ["migrate_cancel", "cont"]
    assert not path.exists()


def test_a_load_that_does_not_complete_fails(tmp_path: Path) -> None:
    mon = ScriptedMonitor(["failed"])
    with pytest.raises(OperationFailed, match="restoring v"):
        asyncio.run(saved.load_state("v", cast(Monitor, mon), tmp_path / "v.state"))
    assert mon.calls[0] == ("migrate-incoming", {"uri": f"file:{tmp_path / 'v.state'}"})


class CancellableSave(ScriptedMonitor):
    """A save that stays under way until it is cancelled, and a guest that runs or not."""

    def __init__(self) -> None:
        super().__init__(["none"])
        self.running = True
        self.saving = False
        self.started = asyncio.Event()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-migrate":
            return {"status": "active" if self.saving else "none"}
        self.running = {"stop": False, "cont": True}.get(cmd, self.running)
        self.saving = {"migrate": True, "migrate_cancel": False}.get(cmd, self.saving)
        if cmd == "migrate":
            self.started.set()
        return [] if cmd == "query-migrate-capabilities" else {}


def test_a_save_whose_caller_is_cancelled_is_undone(tmp_path: Path) -> None:
    """An agent shutting down (or a request dropped) mid-save: the guest runs on, no save
    goes on behind it, no file is left, and the cancellation is not turned into an error."""
    path = tmp_path / "v.state"
    mon = CancellableSave()

    async def scenario() -> None:
        task = asyncio.ensure_future(saved.save_state("v", cast(Monitor, mon), path))
        await mon.started.wait()
        path.write_bytes(b"partial")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert mon.running and not mon.saving
    assert not path.exists()
