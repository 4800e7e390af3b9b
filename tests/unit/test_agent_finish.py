"""The paused destination (issue 22): QEMU starts with -S, loads the stream and runs only on the
word that its source completed, given by the source agent (or the manager) for that migration's
id; remembered when it comes before the stream is loaded, across an agent restart too. Over the
real VmManager and Migrations, each QEMU scripted (tests/unit/migrating_qemu.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qmotion.agent.errors import AgentError, Conflict
from qmotion.agent.migration.migrate import Migrations
from qmotion.api.migration import IncomingRequest, MigrationParams, OutgoingRequest, PeerRef
from qmotion.api.vm import VmState
from tests.unit.migrating_qemu import M1, M2, Cluster, Host, cluster_at, until


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with cluster_at(tmp_path, monkeypatch) as c:
        yield c


def record(host: Host) -> dict[str, object]:
    data: dict[str, object] = json.loads((host.vms_dir / "vm1" / "migration.json").read_text())
    return data


async def arrive(
    cluster: Cluster, dst: Migrations, migration: str | None = M1, start: str = "paused"
) -> str:
    params = MigrationParams.model_validate({"destination_start": start})
    req = IncomingRequest(spec=cluster.spec(), migration_id=migration, params=params)
    return (await dst.incoming(req)).uri


def test_a_loaded_destination_never_runs_without_the_word(cluster: Cluster) -> None:
    """Without -S QEMU runs the guest by itself when the stream completes (the old agent):
    then a source resumed by QEMU's cancel-at-completion race is a second running copy."""

    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        assert "-S" in cluster.argv["h2", "vm1"]
        qemu = host.qemus["vm1"]
        qemu.load("active")
        qemu.complete_incoming()
        await asyncio.sleep(0.2)
        assert qemu.run_state == "paused"
        info = await host.info("vm1")
        assert (info.state, info.incoming_migration) == (VmState.PAUSED, M1)

    asyncio.run(run())


def test_the_word_before_the_stream_is_loaded_is_remembered_and_acted_on_at_completed(
    cluster: Cluster,
) -> None:
    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        qemu = host.qemus["vm1"]
        qemu.load("active")
        info = await dst.finish("vm1", M1, wait_ms=100)
        assert info.state == VmState.PAUSED  # still loading: nothing to run yet
        assert record(host)["incoming"] == {
            "id": M1,
            "finish": True,
            "start": "paused",
            "ran": False,
            "source": [],
        }
        qemu.load("device")
        qemu.complete_incoming()
        await until(lambda: qemu.run_state == "running")
        assert qemu.hazards == []  # never a cont while the stream still loads
        assert record(host)["incoming"] == {
            "id": M1,
            "finish": True,
            "start": "paused",
            "ran": True,
            "source": [],
        }
        await dst.keep_disks("vm1", M1)  # the manager saw it run: confirmed here
        assert (await host.info("vm1")).incoming_migration is None

    asyncio.run(run())


def test_the_word_is_only_for_that_migration_and_never_for_a_failed_stream(
    cluster: Cluster,
) -> None:
    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        qemu = host.qemus["vm1"]
        qemu.load("active")
        qemu.complete_incoming()
        with pytest.raises(Conflict, match="not the destination of migration"):
            await dst.finish("vm1", M2)
        with pytest.raises(Conflict):
            await dst.keep_disks("vm1", M2)
        assert qemu.run_state == "paused" and "cont" not in qemu.commands
        qemu.set_migration("failed")
        with pytest.raises(Conflict, match="failed here"):
            await dst.finish("vm1", M1)
        assert qemu.run_state == "paused"

    asyncio.run(run())


def test_a_word_given_before_an_agent_restart_is_acted_on_after_it(cluster: Cluster) -> None:
    """The destination was told to run while loading; the agent restarted and QEMU completed
    while it was away: the restarted agent runs it."""

    async def before() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        host.qemus["vm1"].load("device")
        await dst.finish("vm1", M1)

    asyncio.run(before())  # the agent's process ends with its loop
    qemu = cluster.qemus["h2"]["vm1"]
    qemu.complete_incoming()
    assert qemu.run_state == "paused"

    async def after() -> None:
        host, _ = await cluster.host("h2")
        assert qemu.run_state == "running"
        assert (await host.info("vm1")).incoming_migration == M1  # not confirmed yet

    asyncio.run(after())


def test_a_restarted_agent_follows_a_stream_still_loading_and_acts_on_the_word(
    cluster: Cluster,
) -> None:
    asyncio.run(_arrive_loading(cluster))

    async def after() -> None:
        _, dst = await cluster.host("h2")
        qemu = cluster.qemus["h2"]["vm1"]
        await dst.finish("vm1", M1)
        qemu.complete_incoming()
        await until(lambda: qemu.run_state == "running")

    asyncio.run(after())


async def _arrive_loading(cluster: Cluster) -> None:
    host, dst = await cluster.host("h2")
    await arrive(cluster, dst)
    host.qemus["vm1"].load("active")


def test_a_paused_destination_runs_by_itself_once_postcopy_is_active(cluster: Cluster) -> None:
    """In postcopy the source stopped for good (it is never resumed or cancelled then): the
    destination runs at once, once QEMU loaded the device state (never a cont before)."""

    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        qemu = host.qemus["vm1"]
        qemu.load("active")
        qemu.set_migration("postcopy-active")
        await asyncio.sleep(0.1)
        assert qemu.run_state == "inmigrate" and qemu.hazards == []
        qemu.postcopy_run()
        await until(lambda: qemu.run_state == "running")
        assert qemu.hazards == []

    asyncio.run(run())


@pytest.mark.parametrize("migration", [M1, None])
def test_auto_or_a_migration_without_id_starts_as_before(
    cluster: Cluster, migration: str | None
) -> None:
    """``auto`` (kept for measurement) and an old manager's id-less migration: no -S, QEMU
    runs the guest by itself."""

    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst, migration, start="auto" if migration else "paused")
        assert "-S" not in cluster.argv["h2", "vm1"]
        qemu = host.qemus["vm1"]
        qemu.complete_incoming()
        assert qemu.run_state == "running"
        if migration is not None:
            assert (await dst.finish("vm1", migration)).state == VmState.RUNNING

    asyncio.run(run())


# ---------------------------------------------------------------------- the source's word


class DestinationAgent:
    """The destination agent behind the source's peer client: its finish route, or an
    answer of ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.dst: Migrations | None = None
        self.status = status
        self.calls: list[str] = []

    def transport(self, url: str) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/migration/finish"):
            self.calls.append(str(request.url))
            if self.status != 200 or self.dst is None:
                return httpx.Response(self.status, text="unavailable")
            try:
                info = await self.dst.finish("vm1", request.url.params["migration"])
            except AgentError as exc:
                return httpx.Response(exc.status, json={"error": {"message": exc.message}})
            return httpx.Response(200, json=info.model_dump(mode="json"))
        return httpx.Response(200, json={})


async def _two_hosts(
    cluster: Cluster, peer: DestinationAgent
) -> tuple[Host, Migrations, Host, Migrations]:
    src_host, src = await cluster.host("h1", "198.19.1.11", peers=peer.transport)
    await src_host.define(cluster.spec())
    await src_host.start("vm1")
    dst_host, dst = await cluster.host("h2")
    peer.dst = dst
    uri = await arrive(cluster, dst)
    ref = PeerRef(url="http://198.19.1.12:8100", token="t" * 32, vm="vm1")
    await src.outgoing("vm1", OutgoingRequest(uri=uri, migration_id=M1, peer=ref))
    return src_host, src, dst_host, dst


@pytest.mark.parametrize("loaded_first", [True, False])
def test_the_source_agent_gives_the_word_once_its_qemu_is_in_postmigrate(
    cluster: Cluster, loaded_first: bool
) -> None:
    peer = DestinationAgent()

    async def run() -> None:
        src_host, src, dst_host, _ = await _two_hosts(cluster, peer)
        sq, dq = src_host.qemus["vm1"], dst_host.qemus["vm1"]
        sq.set_migration("active")
        dq.load("active")
        sq.stop_for_switchover()
        if loaded_first:
            dq.complete_incoming()
        sq.complete_outgoing(postmigrate=False)  # QEMU sets postmigrate a moment later
        await asyncio.sleep(0.1)
        assert peer.calls == [] and dq.run_state != "running"
        sq.set_run_state("postmigrate")
        await until(lambda: len(peer.calls) == 1)
        assert f"migration={M1}" in peer.calls[0]
        if not loaded_first:
            assert dq.run_state == "inmigrate"  # the word is remembered until then
            dq.complete_incoming()
        await until(lambda: dq.run_state == "running")
        stats = await src.stats("vm1", 0, None, M1)
        assert (stats.status, stats.migration_id, stats.finish_error) == ("completed", M1, None)
        assert stats.finish_ms is not None and stats.finish_ms > 0
        assert dq.hazards == []

    asyncio.run(run())


def test_a_word_that_did_not_reach_the_destination_is_recorded_not_raised(
    cluster: Cluster,
) -> None:
    peer = DestinationAgent(status=503)

    async def run() -> None:
        src_host, src, dst_host, _ = await _two_hosts(cluster, peer)
        sq, dq = src_host.qemus["vm1"], dst_host.qemus["vm1"]
        sq.set_migration("active")
        sq.stop_for_switchover()
        dq.complete_incoming()
        sq.complete_outgoing()
        stats = await src.stats("vm1", 0, None, M1)
        await until(lambda: len(peer.calls) == 1)
        stats = await src.stats("vm1", 0, None, M1)
        assert stats.status == "completed"
        assert stats.finish_error == "HTTP 503: unavailable" and stats.finish_ms is None
        assert dq.run_state == "paused"  # the manager's word is still to come

    asyncio.run(run())


def test_a_destination_that_ran_and_stopped_is_never_torn_down(cluster: Cluster) -> None:
    """It ran on the word, then its QEMU stopped before the manager saw it run: it may have
    written to disks the source shares, so the manager's recovery must not delete it and
    resume the source over those writes (found in review: only "runs now" was refused)."""

    async def run() -> None:
        host, dst = await cluster.host("h2")
        await arrive(cluster, dst)
        qemu = host.qemus["vm1"]
        qemu.load("active")
        qemu.complete_incoming()
        await dst.finish("vm1", M1, wait_ms=1000)
        assert qemu.run_state == "running"
        await host.stop("vm1", force=True)  # its QEMU ended here after running
        assert (await host.info("vm1")).state == VmState.STOPPED
        with pytest.raises(Conflict, match="ran here"):
            await dst.delete("vm1", force=True, migration=M1)
        assert "vm1" in host.names()

    asyncio.run(run())
