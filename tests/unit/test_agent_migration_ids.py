"""Every agent answer about a live migration is for one migration's id (issue 22): QEMU's
``completed`` says that *a* stream ended, and only the VM's migration record says which. An
arrival's or a restore's ``completed`` is never an outgoing one, a copy that left in another
migration is never resumed (``stale_copy``), and a destination's teardown never deletes a VM
that runs or that did not arrive by that migration. Over the real VmManager and Migrations,
each QEMU scripted (tests/unit/migrating_qemu.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.agent.errors import Conflict, MigratedAway, StaleCopy, VmNotFound
from qmotion.agent.migration.migrate import Migrations
from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import IncomingRequest, MigrationParams, OutgoingRequest
from qmotion.api.vm import VmState
from qmotion.hypervisor.errors import QmpError
from tests.unit.migrating_qemu import M1, M2, Cluster, Host, MigratingQemu, cluster_at, until

URI = "tcp:198.19.1.12:40123"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with cluster_at(tmp_path, monkeypatch) as c:
        yield c


async def arrived(cluster: Cluster, migration: str = M1) -> tuple[Host, Migrations, MigratingQemu]:
    """h1 runs vm1, which arrived by ``migration``: QEMU says ``completed`` (an arrival's)."""
    host, agent = await cluster.host("h1")
    auto = MigrationParams.model_validate({"destination_start": "auto"})
    await agent.incoming(IncomingRequest(spec=cluster.spec(), migration_id=migration, params=auto))
    qemu = host.qemus["vm1"]
    qemu.load("active")
    qemu.complete_incoming()
    return host, agent, qemu


async def sent_away(
    cluster: Cluster, migration: str = M1
) -> tuple[Host, Migrations, MigratingQemu]:
    """h1's vm1 completed its outgoing ``migration``: its QEMU is in postmigrate."""
    host, agent = await cluster.host("h1")
    await host.define(cluster.spec())
    await host.start("vm1")
    qemu = host.qemus["vm1"]
    await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=migration))
    qemu.set_migration("active")
    qemu.stop_for_switchover()
    qemu.complete_outgoing()
    await until(lambda: not agent.migrating("vm1"))
    return host, agent, qemu


def test_an_arrivals_completed_is_not_reported_for_a_migration_id(cluster: Cluster) -> None:
    """The issue's third interleaving: a rollback of M2 before its ``migrate`` was issued read
    the arrival's ``completed`` as "migrated away" (the old resume refused: migrated_away)."""

    async def run() -> None:
        host, agent, qemu = await arrived(cluster)
        await agent.keep_disks("vm1", M1)  # confirmed: simply here now
        assert qemu.migration == "completed"
        stats = await agent.stats("vm1", 0, None, M2)
        assert (stats.status, stats.migration_id) == ("none", None)
        info = await host.info("vm1")
        assert (info.incoming_migration, info.outgoing_migration, info.outgoing_status) == (
            None,
            None,
            None,
        )
        assert await agent.resume("vm1", migration=M2) == "running"
        qemu.set_run_state("paused")
        assert await agent.resume("vm1", after_failed_switchover=True, migration=M2) == "running"
        assert qemu.run_state == "running"

    asyncio.run(run())


def test_stats_and_cancel_for_another_migration_say_none_and_touch_nothing(
    cluster: Cluster,
) -> None:
    async def run() -> None:
        host, agent = await cluster.host("h1")
        await host.define(cluster.spec())
        await host.start("vm1")
        qemu = host.qemus["vm1"]
        started = await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M1))
        assert (started.status, started.migration_id) == ("setup", M1)
        qemu.set_migration("active")
        assert (await agent.stats("vm1", 0, None, M2)).status == "none"
        mine = await agent.stats("vm1", 0, None, M1)
        assert (mine.status, mine.migration_id) == ("active", M1)
        assert (await agent.cancel("vm1", M2)).status == "none"
        assert "migrate_cancel" not in qemu.commands and qemu.migration == "active"
        assert (await agent.cancel("vm1", M1)).status == "cancelled"

    asyncio.run(run())


def test_a_copy_that_went_away_in_another_migration_is_never_resumed(cluster: Cluster) -> None:
    """The issue's second interleaving: M1 completed (the VM runs on its destination, the
    inventory still names this host); the next migration, M2, is refused and rolls back. The
    old resume took M1's ``completed`` for M2's switchover and resumed the stale copy."""

    async def run() -> None:
        host, agent, qemu = await sent_away(cluster, M1)
        with pytest.raises(Conflict, match="postmigrate"):
            await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M2))
        assert (await agent.stats("vm1", 0, None, M2)).status == "none"
        with pytest.raises(StaleCopy) as stale:
            await agent.resume("vm1", after_failed_switchover=True, migration=M2)
        assert stale.value.code == AgentErrorCode.STALE_COPY and M1 in stale.value.message
        with pytest.raises(Conflict):
            await agent.release("vm1", M2)
        assert qemu.run_state == "postmigrate" and "cont" not in qemu.commands
        assert qemu.alive and "vm1" in host.names()
        with pytest.raises(MigratedAway):  # M1 itself: it completed, the destination runs it
            await agent.resume("vm1", migration=M1)
        await agent.release("vm1", M1)
        assert not qemu.alive and "vm1" not in host.names()
        assert not (host.vms_dir / "vm1").exists()  # the record went with the VM

    asyncio.run(run())


def test_release_needs_postmigrate_from_that_very_migration(cluster: Cluster) -> None:
    """A VM that arrived by M1 (QEMU: completed) whose outgoing M2 QEMU refused: its
    ``completed`` is not M2's, whatever the record says; nor is one still in finish-migrate."""

    async def run() -> None:
        host, agent, qemu = await arrived(cluster, M1)
        qemu.refuse_migrate = "Failed to connect socket: Connection refused"
        with pytest.raises(QmpError, match="refused"):
            await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M2))
        outgoing = json.loads((host.vms_dir / "vm1" / "migration.json").read_text())["outgoing"]
        assert outgoing["id"] == M2 and qemu.migration == "completed"
        assert (await agent.stats("vm1", 0, None, M2)).status == "failed"
        assert (await host.info("vm1")).outgoing_status == "failed"
        with pytest.raises(Conflict, match="not migrated away"):
            await agent.release("vm1", M2)
        qemu.run_state = "finish-migrate"
        assert (await agent.stats("vm1", 0, None, M2)).status == "device"
        with pytest.raises(Conflict):
            await agent.release("vm1", M2)
        assert qemu.alive and "vm1" in host.names()

    asyncio.run(run())


def test_a_destinations_teardown_never_deletes_a_vm_that_runs_or_came_otherwise(
    cluster: Cluster,
) -> None:
    """The issue's first interleaving ends in a delete of the running destination; and a
    teardown of migration M2 must not delete the VM that arrived earlier by M1."""

    async def run() -> None:
        host, agent, qemu = await arrived(cluster, M1)
        with pytest.raises(Conflict, match="runs here"):
            await agent.delete("vm1", force=True, migration=M1)
        with pytest.raises(Conflict, match="not the destination of migration"):
            await agent.delete("vm1", force=True, migration=M2)
        await agent.keep_disks("vm1", M1)
        qemu.set_run_state("paused")  # confirmed, then paused: still not M1's to delete
        with pytest.raises(Conflict, match="not the destination of migration"):
            await agent.delete("vm1", force=True, migration=M1)
        assert qemu.alive and "vm1" in host.names()

    asyncio.run(run())


def test_a_destination_that_never_ran_is_torn_down_by_its_migration(cluster: Cluster) -> None:
    async def run() -> None:
        host, agent = await cluster.host("h1")
        await agent.incoming(IncomingRequest(spec=cluster.spec(), migration_id=M1))
        qemu = host.qemus["vm1"]
        qemu.load("active")
        qemu.complete_incoming()  # loaded, paused: never ran
        await agent.delete("vm1", force=True, migration=M1)
        assert not qemu.alive or "vm1" not in host.names()
        with pytest.raises(VmNotFound):
            await host.info("vm1")

    asyncio.run(run())


def test_the_record_survives_an_agent_restart_and_binds_qemus_status_to_the_id(
    cluster: Cluster,
) -> None:
    seen_at_migrate: list[object] = []

    async def before() -> None:
        host, agent = await cluster.host("h1")
        await host.define(cluster.spec())
        await host.start("vm1")
        qemu = host.qemus["vm1"]
        path = host.vms_dir / "vm1" / "migration.json"
        qemu.on_migrate.append(
            lambda: seen_at_migrate.append(path.exists() and json.loads(path.read_text()))
        )
        await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M1))
        qemu.set_migration("active")

    asyncio.run(before())
    assert [r and r["outgoing"]["id"] for r in seen_at_migrate] == [M1]  # type: ignore[index]
    qemu = cluster.qemus["h1"]["vm1"]
    qemu.stop_for_switchover()  # the agent is away: QEMU goes on
    qemu.complete_outgoing()

    async def after() -> None:
        host, agent = await cluster.host("h1")
        mine = await agent.stats("vm1", 0, None, M1)
        assert (mine.status, mine.migration_id) == ("completed", M1)
        assert (await agent.stats("vm1", 0, None, M2)).status == "none"
        info = await host.info("vm1")
        assert (info.state, info.outgoing_migration, info.outgoing_status) == (
            VmState.PAUSED,
            M1,
            "completed",
        )
        with pytest.raises(StaleCopy):
            await agent.resume("vm1", after_failed_switchover=True, migration=M2)
        with pytest.raises(Conflict):
            await agent.release("vm1", M2)
        await agent.release("vm1", M1)
        assert "vm1" not in host.names()

    asyncio.run(after())


def test_a_restarted_agent_never_resumes_a_copy_that_went_postcopy(cluster: Cluster) -> None:
    """The stream entered postcopy: the record keeps it, so an agent restarted since still
    refuses to resume the copy (the destination has written to memory it lacks)."""

    async def before() -> None:
        host, agent = await cluster.host("h1")
        await host.define(cluster.spec())
        await host.start("vm1")
        qemu = host.qemus["vm1"]
        await agent.outgoing("vm1", OutgoingRequest(uri=URI, migration_id=M1))
        qemu.set_migration("active")
        qemu.stop_for_switchover()
        qemu.set_migration("postcopy-active")
        await asyncio.sleep(0.05)

    asyncio.run(before())
    qemu = cluster.qemus["h1"]["vm1"]
    qemu.set_migration("completed")
    qemu.set_run_state("postmigrate")

    async def after() -> None:
        _, agent = await cluster.host("h1")
        with pytest.raises(MigratedAway, match="postcopy"):
            await agent.resume("vm1", after_failed_switchover=True, migration=M1)
        assert "cont" not in qemu.commands

    asyncio.run(after())
