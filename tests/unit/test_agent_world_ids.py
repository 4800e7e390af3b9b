"""The scripted agents (tests/unit/agent_world/) answer issue 22's contract as the real agent
does (qmotion.agent.migration: outgoing.stats, confirm, finish; agent.vms.migration_record),
through the typed client the manager uses: a fake more forgiving than the agent would hide
the bugs the migration tests are there to catch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import IncomingRequest, MigrationParams, OutgoingRequest, PeerRef
from qmotion.api.vm import GuestConfig, Nic, VmSpec, VmState
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, Conflict
from tests.unit.agent_world import World
from tests.unit.agent_world.cluster import FakeVm

M1, M2 = "1" * 32, "2" * 32
TOKEN = "t" * 32


@pytest.fixture
def world() -> Iterator[World]:
    yield World(polls_to_complete=10_000)


def _client(world: World, host: str) -> AgentClient:
    return world.connector().client(f"http://agent-{host}.test:7100", TOKEN)


def _vm(world: World, host: str = "h1") -> FakeVm:
    spec = VmSpec(
        name="vm1",
        memory="256M",
        nics=[Nic(mac="52:54:00:00:00:01")],
        guest=GuestConfig(),
        cpu_model="qemu64",
        machine="pc-i440fx-10.0",
    )
    world.vms[host]["vm1"] = FakeVm(spec=spec, runstate="running")
    return world.vms[host]["vm1"]


def _migrate(world: World, migration: str | None, start: str = "paused") -> None:
    """vm1 h1 -> h2 by ``migration``, up to QEMU's completion."""
    src = world.vms["h1"]["vm1"]
    params = MigrationParams(destination_start="paused" if start == "paused" else "auto")
    with _client(world, "h2") as c:
        c.incoming(IncomingRequest(spec=src.spec, migration_id=migration, params=params))
    peer = PeerRef(url="http://agent-h2.test:7100", token=TOKEN, vm="vm1")
    req = OutgoingRequest(
        uri="tcp:198.18.0.2:4444", migration_id=migration, params=params, peer=peer
    )
    with _client(world, "h1") as c:
        c.migrate("vm1", req)


def _code(exc: ApiError) -> str:
    return exc.detail.code


def test_figures_and_completed_belong_to_one_migration(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    with _client(world, "h1") as c:
        assert c.migration("vm1", migration=M1).status == "active"
        other = c.migration("vm1", migration=M2)
        assert other.status == "none"  # no migration M2 here
        assert c.cancel_migration("vm1", migration=M2).status == "none"  # untouched
        assert world.vms["h1"]["vm1"].migration == "active"
    assert world.complete("vm1")
    with _client(world, "h1") as c:
        assert c.migration("vm1", migration=M1).status == "completed"
        info = c.vm("vm1")
        assert (info.outgoing_migration, info.outgoing_status) == (M1, "completed")


def test_the_destination_starts_paused_and_runs_on_the_word(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    world.vms["h1"]["vm1"].gives_word = False  # the source agent's watcher does not act
    world.complete("vm1")
    with _client(world, "h2") as c:
        info = c.vm("vm1")
        assert info.state == VmState.PAUSED and info.incoming_migration == M1
        with pytest.raises(Conflict):
            c.finish_migration("vm1", M2)  # not M2's destination
        assert c.finish_migration("vm1", M1).state == VmState.RUNNING
        c.keep_disks("vm1", migration=M1)  # confirmed here: the record goes
        assert c.vm("vm1").incoming_migration is None
        c.keep_disks("vm1", migration=M1)  # asked again (a lost answer): fine


def test_the_source_agent_gives_the_word_itself(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    world.complete("vm1")
    assert world.running_copies("vm1") == ["h2"]
    with _client(world, "h1") as c:
        assert c.migration("vm1", migration=M1).finish_ms is not None
    # Without an id (a manager from before ids), QEMU runs the destination by itself.
    legacy = World(polls_to_complete=10_000)
    _vm(legacy)
    _migrate(legacy, None)
    assert legacy.vms["h2"]["vm1"].incoming is not None
    legacy.vms["h1"]["vm1"].gives_word = False
    legacy.complete("vm1")
    assert legacy.running_copies("vm1") == ["h2"]


def test_a_stale_copy_is_never_resumed_nor_released_for_another_migration(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    world.complete("vm1")
    with _client(world, "h1") as c:
        for after_failed in (False, True):
            with pytest.raises(Conflict) as exc:
                c.resume("vm1", after_failed_switchover=after_failed, migration=M2)
            assert _code(exc.value) == AgentErrorCode.STALE_COPY
        with pytest.raises(Conflict) as refused:
            c.release("vm1", migration=M2)
        assert _code(refused.value) == AgentErrorCode.CONFLICT
        with pytest.raises(Conflict) as away:
            c.resume("vm1", migration=M1)
        assert _code(away.value) == AgentErrorCode.MIGRATED_AWAY
    assert world.vms["h1"]["vm1"].runstate == "postmigrate"


def test_an_arrivals_completed_is_no_switchover(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    world.complete("vm1")
    with _client(world, "h2") as c:
        c.keep_disks("vm1", migration=M1)
        arrived = world.vms["h2"]["vm1"]
        assert arrived.migration == "completed"  # as QEMU reports it after an arrival
        assert c.migration("vm1", migration=M2).status == "none"
        arrived.runstate = "paused"
        assert c.resume("vm1", migration=M2) == "running"  # resumed as any rollback's


def test_a_destination_is_deleted_by_its_id_only_and_never_when_it_ran(world: World) -> None:
    _vm(world)
    _migrate(world, M1)
    with _client(world, "h2") as c:
        with pytest.raises(Conflict):
            c.delete("vm1", force=True, migration=M2)  # another migration's
        world.vms["h1"]["vm1"].gives_word = False
        world.complete("vm1")
        c.finish_migration("vm1", M1)
        with pytest.raises(Conflict):
            c.delete("vm1", force=True, migration=M1)  # it runs here
    assert world.running_copies("vm1") == ["h2"]
    fresh = World(polls_to_complete=10_000)
    _vm(fresh)
    _migrate(fresh, M1)
    with _client(fresh, "h2") as c:
        c.delete("vm1", force=True, migration=M1)  # never ran: removed
    assert "vm1" not in fresh.vms["h2"]


def test_records_survive_an_agent_restart_and_the_word_is_kept(world: World) -> None:
    """The word came while the stream was still loading, then the destination's agent went
    down and came back: the record kept the word, the loaded destination runs."""
    _vm(world)
    _migrate(world, M1)
    world.vms["h1"]["vm1"].gives_word = False
    with _client(world, "h2") as c:
        assert c.finish_migration("vm1", M1).state == VmState.PAUSED  # still loading
    world.down.add("h2")
    world.complete("vm1")
    assert world.running_copies("vm1") == []  # its agent is down: nothing acts on the word
    world.restart_agent("h2")
    assert world.running_copies("vm1") == ["h2"]
    with _client(world, "h2") as c:
        assert c.vm("vm1").incoming_migration == M1
    with _client(world, "h1") as c:
        world.restart_agent("h1")
        assert c.vm("vm1").outgoing_migration == M1
        assert c.migration("vm1", migration=M1).status == "completed"
