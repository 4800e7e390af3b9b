"""The source's guard of a switchover that hangs while the guest is paused (issue 22): QEMU
sending its device state holds its big lock, so a link that dies then leaves the guest paused
until TCP gives up (~15 min) and every ordinary QMP command waits. Past max(5 s, 10 x the
downtime limit) the agent yanks the stream out of band; QEMU fails it and resumes the guest
here. The decision is pure (``yank_due``); the agent wires it, after a restart too."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.agent.migration import guard, outgoing
from qmotion.agent.migration.guard import stuck_limit_s, yank_due
from qmotion.agent.migration.migrate import Migrations
from qmotion.api.migration import MigrationParams, OutgoingRequest
from tests.unit.migrating_qemu import M1, Cluster, Host, MigratingQemu, cluster_at, until

URI = "tcp:198.19.1.12:40123"


@pytest.mark.parametrize(
    ("status", "paused_for_s", "downtime_ms", "due"),
    [
        ("device", 4.9, 20, False),  # never sooner than 5 s
        ("device", 5.1, 20, True),
        ("device", 9.0, 1000, False),  # ... nor sooner than ten downtime limits
        ("device", 10.1, 1000, True),
        ("pre-switchover", 5.1, 300, True),  # past the mirror's end
        # Stopped for the final copy without pause-before-switchover: QEMU still says active.
        ("active", 5.1, 20, True),
        ("completed", 600.0, 300, False),
        ("postcopy-device", 600.0, 300, False),  # postcopy: the destination runs it next
    ],
)
def test_a_switchover_is_yanked_only_past_its_limit(
    status: str, paused_for_s: float, downtime_ms: int, due: bool
) -> None:
    assert yank_due(status, 100.0, 100.0 + paused_for_s, downtime_ms) is due


def test_a_status_not_yet_guarded_is_never_yanked() -> None:
    """pre-switchover while the disks' mirrors still end: their end has its own limits; and a
    guest that was never stopped for a switchover (the stall watchdogs' business)."""
    assert not yank_due("pre-switchover", None, 1e9, 20)
    assert not yank_due("active", None, 1e9, 20)
    assert stuck_limit_s(20) == 5.0 and stuck_limit_s(2000) == 20.0


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The limit's floor, scaled down so that a test waits a fraction of a second.
    monkeypatch.setattr(guard, "MIN_STUCK_S", 0.3)
    monkeypatch.setattr(guard, "YANK_SETTLE_S", 0.05)
    with cluster_at(tmp_path, monkeypatch) as c:
        yield c


async def switching_over(cluster: Cluster) -> tuple[Host, Migrations, MigratingQemu]:
    host, agent = await cluster.host("h1")
    await host.define(cluster.spec())
    await host.start("vm1")
    qemu = host.qemus["vm1"]
    params = MigrationParams(pause_before_switchover=True, steer=False, forward=False)
    await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M1, params=params))
    qemu.set_migration("active")
    return host, agent, qemu


def test_a_device_state_stuck_on_a_dead_link_is_yanked_and_the_guest_resumes_here(
    cluster: Cluster,
) -> None:
    async def run() -> None:
        _, agent, qemu = await switching_over(cluster)
        qemu.stop_for_switchover()
        await until(lambda: qemu.migration == "device")  # the agent let it continue
        qemu.bql_held = True  # the link died mid-write: QEMU holds its big lock
        await asyncio.sleep(0.2)
        assert qemu.run_state == "finish-migrate" and "yank" not in qemu.commands
        await until(lambda: qemu.run_state == "running", timeout_s=2.0)
        assert "yank" in qemu.commands and qemu.migration == "failed"
        stats = await agent.stats("vm1", 0, None, M1)
        assert stats.status == "failed" and "hung" in (stats.error or "")
        assert "yanked" in [status for status, _ in stats.events]

    asyncio.run(run())


def test_a_switchover_that_cannot_even_continue_is_yanked(cluster: Cluster) -> None:
    """pre-switchover, the mirrors ended: the agent's migrate-continue itself waits for the
    big lock; only the out-of-band yank gets through."""

    async def run() -> None:
        _, _, qemu = await switching_over(cluster)
        qemu.bql_held = True
        qemu.stop_for_switchover()
        await until(lambda: qemu.run_state == "running", timeout_s=2.0)
        assert "yank" in qemu.commands and qemu.migration == "failed"

    asyncio.run(run())


def test_a_final_copy_stuck_without_pause_before_switchover_is_yanked(cluster: Cluster) -> None:
    """The usual case: no pause-before-switchover, so QEMU never says "device"; its status
    stays "active" while the guest is stopped for the final copy under QEMU's big lock. The
    stretch starts at the source's STOP (found in the lab: a guard keyed on "device" alone
    never fired there)."""

    async def run() -> None:
        host, agent = await cluster.host("h1")
        await host.define(cluster.spec())
        await host.start("vm1")
        qemu = host.qemus["vm1"]
        params = MigrationParams(steer=False, forward=False)
        await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M1, params=params))
        qemu.set_migration("active")
        qemu.stop_for_switchover()
        qemu.bql_held = True
        await asyncio.sleep(0.15)
        assert qemu.migration == "active" and "yank" not in qemu.commands
        await until(lambda: qemu.run_state == "running", timeout_s=2.0)
        assert "yank" in qemu.commands and qemu.migration == "failed"

    asyncio.run(run())


def test_a_device_state_that_ends_in_time_is_left_alone(cluster: Cluster) -> None:
    async def run() -> None:
        _, agent, qemu = await switching_over(cluster)
        qemu.stop_for_switchover()
        await until(lambda: qemu.migration == "device")
        await asyncio.sleep(0.15)
        qemu.complete_outgoing()
        await until(lambda: not agent.migrating("vm1"))
        await asyncio.sleep(0.4)
        assert "yank" not in qemu.commands and qemu.run_state == "postmigrate"

    asyncio.run(run())


@pytest.mark.parametrize("lock_held", [False, True])
def test_a_restarted_agent_guards_a_device_state_left_by_its_predecessor(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, lock_held: bool
) -> None:
    """Its watcher died with it: the device state is guarded again at start; a QEMU that
    does not even answer then holds its lock in the switchover of a recorded stream."""
    monkeypatch.setattr(outgoing, "SETTLE_ANSWER_S", 0.3)

    async def before() -> None:
        _, _, qemu = await switching_over(cluster)
        qemu.stop_for_switchover()
        await until(lambda: qemu.migration == "device")

    asyncio.run(before())
    qemu = cluster.qemus["h1"]["vm1"]
    qemu.bql_held = lock_held

    async def after() -> None:
        await cluster.host("h1")
        await until(lambda: qemu.run_state == "running", timeout_s=2.0)
        assert "yank" in qemu.commands and qemu.migration == "failed"

    asyncio.run(after())
