"""The engine over an in-memory cluster: whatever fails or is cancelled, one copy runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from qmotion.api.migration import MigrationStats
from qmotion.migration import engine
from qmotion.migration.errors import DestinationNotRunning, InPostcopy, StepError, SwitchedOver
from qmotion.migration.vocabulary import MigrationState, Phase, Step

STEPS = [
    "prechecks",
    "prepare_destination",
    "start_migration",
    "progress",
    "finish_destination",
    "announce",
    "confirm_source",
    "update_inventory",
    "rollback",
]
POSTCOPY_STEPS = [*STEPS, "recover_postcopy"]


@dataclass
class FakeCluster:
    """Where copies of the VM exist and in what QEMU state."""

    copies: dict[str, str] = field(default_factory=lambda: {"h1": "running"})
    inventory_host: str = "h1"
    max_running_seen: int = 1
    mirror: str | None = None  # the source's disk mirror into the destination
    # Hosts holding the VM's disk; None: shared storage, the same disk seen from both.
    disks: set[str] | None = None

    def check(self) -> None:
        if "postcopy-source" in self.copies.values():
            # The VM's memory is split between the two: losing either loses the VM.
            assert set(self.copies) == {"h1", "h2"}, f"a postcopy half was removed: {self.copies}"
        running = sum(1 for s in self.copies.values() if s == "running")
        self.max_running_seen = max(self.max_running_seen, running)
        assert running <= 1, f"two running copies: {self.copies}"
        for host, state in self.copies.items():
            if self.disks is not None and state in ("running", "postmigrate"):
                assert host in self.disks, f"{host} runs without its disk: {self.disks}"


@dataclass
class FakePort:
    cluster: FakeCluster
    fail_at: str | None = None
    fail_after_effect: bool = False
    script: list[str] = field(default_factory=lambda: ["active", "active", "completed"])
    cancel_after_progress: int | None = None
    cancel: asyncio.Event | None = None
    mirror_polls: int = 0
    copy_disks: bool = False
    calls: list[str] = field(default_factory=list)
    postcopy_requested: bool = False

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_at == name and not self.fail_after_effect:
            raise StepError(name, "injected failure")

    def _leave(self, name: str) -> None:
        self.cluster.check()
        if self.fail_at == name and self.fail_after_effect:
            raise StepError(name, "injected failure after its effect")

    async def prechecks(self) -> None:
        self._enter("prechecks")
        self._leave("prechecks")

    async def prepare_destination(self) -> str:
        self._enter("prepare_destination")
        self.cluster.copies["h2"] = "inmigrate"
        if self.copy_disks:
            assert self.cluster.disks is not None
            self.cluster.disks.add("h2")  # empty: the mirror fills it
        self._leave("prepare_destination")
        return "tcp:198.18.1.12:4444"

    async def mirror_disks(self) -> bool:
        self._enter("mirror_disks")
        assert self.cluster.copies.get("h2") == "inmigrate", "mirroring into no destination"
        self.cluster.mirror = "mirroring"
        self.mirror_polls += 1
        self._leave("mirror_disks")
        return self.mirror_polls >= 3

    async def start_migration(self, uri: str) -> None:
        self._enter("start_migration")
        # The RAM moves only once the disks are in sync (shared-nothing).
        assert self.cluster.mirror in (None, "mirroring") and (
            self.cluster.mirror is None or self.mirror_polls >= 3
        )
        self._leave("start_migration")

    async def progress(self, known_status: str | None) -> MigrationStats:
        self._enter("progress")
        status = self.script.pop(0) if self.script else "active"
        n = self.calls.count("progress")
        if self.cancel_after_progress is not None and n >= self.cancel_after_progress:
            assert self.cancel is not None
            self.cancel.set()
        if status == "completed":
            if self.cluster.mirror == "mirroring":
                self.cluster.mirror = "completed"  # ended in sync at the switchover
            self.cluster.copies["h1"] = "postmigrate"
            self.cluster.copies["h2"] = "running"
        elif status == "postcopy-active":
            # The destination runs; the source is stopped but holds the pages not yet sent.
            self.cluster.copies["h1"] = "postcopy-source"
            self.cluster.copies["h2"] = "running"
        elif (
            status in ("postcopy-paused", "failed")
            and "postcopy-source" in self.cluster.copies.values()
        ):
            self.cluster.copies["h2"] = "waiting-for-pages"
        self._leave("progress")
        return MigrationStats(status=status)

    async def finish_destination(self) -> None:
        self._enter("finish_destination")
        if self.cluster.copies.get("h2") != "running":
            raise DestinationNotRunning("destination not running")
        self._leave("finish_destination")

    async def announce(self) -> None:
        self._enter("announce")
        self._leave("announce")

    async def confirm_source(self) -> None:
        self._enter("confirm_source")
        assert self.cluster.copies.get("h2") == "running", "source released before the switch"
        self.cluster.copies.pop("h1", None)
        if self.cluster.mirror == "completed" and self.cluster.disks is not None:
            self.cluster.disks.discard("h1")  # its files replaced by the copy
        self._leave("confirm_source")

    async def update_inventory(self) -> None:
        self._enter("update_inventory")
        self.cluster.inventory_host = "h2"
        self._leave("update_inventory")

    async def rollback(
        self, cancel_migration: bool, teardown_destination: bool, stop_mirror: bool
    ) -> None:
        self._enter("rollback")
        if self.cluster.copies.get("h1") == "postcopy-source":
            raise InPostcopy("the destination runs in postcopy")
        if self.cluster.copies.get("h1") == "postmigrate":
            raise SwitchedOver("completed meanwhile")
        if stop_mirror:
            self.cluster.mirror = None
        if teardown_destination:
            self.cluster.copies.pop("h2", None)
            if self.cluster.disks is not None:
                self.cluster.disks.discard("h2")
        self.cluster.copies["h1"] = "running"
        self._leave("rollback")

    async def recover_postcopy(self) -> None:
        self._enter("recover_postcopy")
        if self.cluster.copies.get("h2") == "waiting-for-pages":
            self.cluster.copies["h2"] = "running"
        self._leave("recover_postcopy")

    async def recover(self) -> None:
        self._enter("recover")
        # Resuming a source whose pages the destination has since rewritten: a stale VM.
        assert self.cluster.copies.get("h1") != "postcopy-source", "resumed a postcopy source"
        self.cluster.copies.pop("h2", None)
        if self.cluster.disks is not None:
            self.cluster.disks.discard("h2")
            self.cluster.mirror = None
        self.cluster.copies["h1"] = "running"
        self._leave("recover")


async def no_wait(seconds: float) -> None:
    """The engine's backoffs, without the wait (the machine decides them; the test has no
    use for the clock)."""
    await asyncio.sleep(0)


def drive(port: FakePort) -> tuple[MigrationState, list[Step]]:
    persisted: list[Step] = []

    async def persist(s: Step, stats: MigrationStats | None) -> None:
        persisted.append(s)

    async def main() -> MigrationState:
        cancel = asyncio.Event()
        port.cancel = cancel
        return await engine.run(port, persist, cancel, copy_disks=port.copy_disks, sleep=no_wait)

    return asyncio.run(main()), persisted


def test_success_moves_the_vm() -> None:
    cluster = FakeCluster()
    final, persisted = drive(FakePort(cluster))
    assert final.phase == Phase.DONE
    assert cluster.copies == {"h2": "running"}
    assert cluster.inventory_host == "h2"
    assert persisted[-1].state.phase == Phase.DONE


def test_qemu_failure_keeps_source() -> None:
    cluster = FakeCluster()
    final, _ = drive(FakePort(cluster, script=["active", "failed"]))
    assert final.phase == Phase.FAILED
    assert cluster.copies == {"h1": "running"}


def test_cancel_during_monitoring() -> None:
    cluster = FakeCluster()
    final, _ = drive(FakePort(cluster, script=["active"] * 50, cancel_after_progress=2))
    assert final.phase == Phase.CANCELLED
    assert cluster.copies == {"h1": "running"}
    assert cluster.inventory_host == "h1"


def test_destination_dead_after_switchover_recovers_source() -> None:
    cluster = FakeCluster()
    port = FakePort(cluster, script=["completed"])

    async def crash_then_verify() -> None:
        port.calls.append("finish_destination")
        cluster.copies.pop("h2", None)  # destination QEMU died right after switchover
        raise DestinationNotRunning("destination gone")  # its agent says so (issue 22)

    port.finish_destination = crash_then_verify  # type: ignore[method-assign]
    final, _ = drive(port)
    assert final.phase == Phase.FAILED
    assert cluster.copies == {"h1": "running"}


@settings(max_examples=150, deadline=None)
@given(
    fail_at=st.sampled_from([None, *STEPS, "mirror_disks"]),
    after=st.booleans(),
    script=st.lists(st.sampled_from(["setup", "active", "device"]), max_size=4).map(
        lambda xs: [*xs, "completed"]
    ),
    cancel_after=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
    copy_disks=st.booleans(),
)
def test_exactly_one_running_copy_whatever_happens(
    fail_at: str | None,
    after: bool,
    script: list[str],
    cancel_after: int | None,
    copy_disks: bool,
) -> None:
    cluster = FakeCluster(disks={"h1"} if copy_disks else None)
    port = FakePort(
        cluster,
        fail_at=fail_at,
        fail_after_effect=after,
        script=script,
        cancel_after_progress=cancel_after,
        copy_disks=copy_disks,
    )
    final, _ = drive(port)
    assert final.terminal
    running = [h for h, s in cluster.copies.items() if s == "running"]
    assert len(running) == 1, cluster.copies
    assert cluster.disks is None or running[0] in cluster.disks  # its disk is where it runs
    if final.phase == Phase.DONE:
        assert running == ["h2"]
        if copy_disks and fail_at != "confirm_source":
            assert cluster.disks == {"h2"}  # the old files went once the copy ran
    elif not final.switched_over:
        assert running == ["h1"]
        assert "h2" not in cluster.copies or fail_at == "rollback"
        if copy_disks and fail_at != "rollback":
            # The mirror stopped and the empty copy went with its destination.
            assert cluster.mirror is None and cluster.disks == {"h1"}


class Crash(BaseException):
    """The manager process dies (not an Exception: the engine retries those, issue 22)."""


def crash_and_restart(
    cluster: FakeCluster,
    script: list[str],
    crash_at: int,
    persisted_before_crash: bool,
    *,
    qemu_went_on: bool = False,
) -> MigrationState | None:
    """The manager dies at persist number ``crash_at`` (the action before it had its effect;
    its record may or may not have reached the database) and a new one resumes from the last
    record; None when the run ended first or nothing was recorded. ``qemu_went_on``: the
    restarted manager sees QEMU where the first left it, not from the script's start."""
    persisted: list[Step] = []

    async def crashing(s: Step, stats: MigrationStats | None) -> None:
        if len(persisted) + 1 == crash_at:
            if persisted_before_crash:
                persisted.append(s)
            raise Crash
        persisted.append(s)

    first = FakePort(cluster, script=list(script))
    try:
        asyncio.run(engine.run(first, crashing, asyncio.Event(), sleep=no_wait))
    except Crash:
        pass
    else:
        return None
    if not persisted:
        return None

    async def again(s: Step, stats: MigrationStats | None) -> None:
        persisted.append(s)

    left = (first.script or ["completed"]) if qemu_went_on else list(script)
    port = FakePort(cluster, script=list(left))
    return asyncio.run(engine.run(port, again, asyncio.Event(), persisted[-1].state, sleep=no_wait))


@settings(max_examples=150, deadline=None)
@given(
    crash_at=st.integers(min_value=1, max_value=12),
    persisted_before_crash=st.booleans(),
    script=st.lists(st.sampled_from(["setup", "active"]), max_size=3).map(
        lambda xs: [*xs, "completed"]
    ),
)
def test_manager_restart_at_any_step_leaves_one_running_copy(
    crash_at: int, persisted_before_crash: bool, script: list[str]
) -> None:
    cluster = FakeCluster()
    final = crash_and_restart(cluster, script, crash_at, persisted_before_crash)
    if final is None:
        return  # finished before the crash point, or died before recording anything
    assert final.terminal
    running = [h for h, state in cluster.copies.items() if state == "running"]
    assert len(running) == 1, cluster.copies
    if final.phase == Phase.DONE:
        assert running == ["h2"] and cluster.inventory_host == "h2"
        assert "h1" not in cluster.copies  # the source was released
    else:
        assert running == ["h1"] and cluster.inventory_host == "h1"
        assert "h2" not in cluster.copies  # the destination was removed


def test_postcopy_completes_on_the_destination() -> None:
    cluster = FakeCluster()
    port = FakePort(cluster, script=["active", "postcopy-active", "postcopy-active", "completed"])
    final, _ = drive(port)
    assert final.phase == Phase.DONE and final.postcopy
    assert cluster.copies == {"h2": "running"} and cluster.inventory_host == "h2"


def test_a_broken_postcopy_stream_is_recovered_not_rolled_back() -> None:
    cluster = FakeCluster()
    script = ["active", "postcopy-active", "postcopy-paused", "postcopy-paused", "completed"]
    port = FakePort(cluster, script=script)
    final, _ = drive(port)
    assert final.phase == Phase.DONE
    assert port.calls.count("recover_postcopy") == 2 and "rollback" not in port.calls
    assert cluster.copies == {"h2": "running"}


def test_qemu_failing_in_postcopy_keeps_both_halves() -> None:
    cluster = FakeCluster()
    final, _ = drive(FakePort(cluster, script=["active", "postcopy-active", "failed"]))
    assert final.phase == Phase.FAILED and "neither QEMU was removed" in (final.error or "")
    assert set(cluster.copies) == {"h1", "h2"}


def test_cancel_in_postcopy_is_too_late() -> None:
    cluster = FakeCluster()
    script = ["active", "postcopy-active", "postcopy-active", "postcopy-active", "completed"]
    final, _ = drive(FakePort(cluster, script=script, cancel_after_progress=3))
    assert final.phase == Phase.DONE and cluster.copies == {"h2": "running"}


@settings(max_examples=200, deadline=None)
@given(
    fail_at=st.sampled_from([None, *POSTCOPY_STEPS]),
    after=st.booleans(),
    before=st.lists(st.sampled_from(["setup", "active"]), max_size=3),
    during=st.lists(st.sampled_from(["postcopy-active", "postcopy-paused"]), max_size=4),
    end=st.sampled_from(["completed", "failed"]),
    cancel_after=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
)
def test_postcopy_never_loses_a_half_whatever_happens(
    fail_at: str | None,
    after: bool,
    before: list[str],
    during: list[str],
    end: str,
    cancel_after: int | None,
) -> None:
    cluster = FakeCluster()
    port = FakePort(
        cluster,
        fail_at=fail_at,
        fail_after_effect=after,
        script=[*before, "postcopy-active", *during, end],
        cancel_after_progress=cancel_after,
    )
    final, _ = drive(port)
    assert final.terminal
    running = [h for h, s in cluster.copies.items() if s == "running"]
    assert len(running) <= 1, cluster.copies
    if final.phase == Phase.DONE:
        assert running == ["h2"]
    elif final.postcopy:
        # Failed in or after postcopy: nothing was removed, nothing resumed on the source.
        assert set(cluster.copies) <= {"h1", "h2"} and "h2" in cluster.copies
        assert cluster.copies.get("h1") != "running"
    else:
        # Stopped before postcopy began (a failure or cancel in pre-copy): the source runs.
        assert running == ["h1"]


@settings(max_examples=150, deadline=None)
@given(
    crash_at=st.integers(min_value=1, max_value=14),
    persisted_before_crash=st.booleans(),
    during=st.lists(st.sampled_from(["postcopy-active", "postcopy-paused"]), max_size=3),
)
def test_manager_restart_in_postcopy_goes_forward(
    crash_at: int, persisted_before_crash: bool, during: list[str]
) -> None:
    """A manager that dies at any step of a migration that went postcopy and starts again
    finishes it on the destination: nothing is rolled back, no half removed."""
    script = ["active", "postcopy-active", *during, "completed"]
    cluster = FakeCluster()
    final = crash_and_restart(cluster, script, crash_at, persisted_before_crash, qemu_went_on=True)
    if final is None:
        return
    assert final.terminal
    running = [h for h, state in cluster.copies.items() if state == "running"]
    assert len(running) <= 1, cluster.copies
    if "postcopy-source" in cluster.copies.values() or final.postcopy:
        # It reached postcopy: forward only.
        assert final.phase == Phase.DONE, (final, cluster.copies)
        assert running == ["h2"] and cluster.inventory_host == "h2"


def test_shared_nothing_copies_then_moves_then_removes_the_old_disk() -> None:
    cluster = FakeCluster(disks={"h1"})
    port = FakePort(cluster, copy_disks=True)
    final, persisted = drive(port)
    assert final.phase == Phase.DONE
    assert cluster.copies == {"h2": "running"} and cluster.disks == {"h2"}
    phases = [p.state.phase for p in persisted]
    assert phases.index(Phase.MIRROR) < phases.index(Phase.START)
    assert port.calls.count("mirror_disks") == 3  # polled until in sync


def test_cancel_during_the_disk_copy_stops_it_and_keeps_the_source() -> None:
    cluster = FakeCluster(disks={"h1"})
    port = FakePort(cluster, copy_disks=True)
    real_mirror = port.mirror_disks

    async def cancel_mid_copy() -> bool:
        synced = await real_mirror()
        assert port.cancel is not None
        port.cancel.set()
        return synced

    port.mirror_disks = cancel_mid_copy  # type: ignore[method-assign]
    final, _ = drive(port)
    assert final.phase == Phase.CANCELLED
    assert cluster.copies == {"h1": "running"} and cluster.disks == {"h1"}
    assert cluster.mirror is None
