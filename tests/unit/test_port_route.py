"""The route a stream takes, chosen by the real port against scripted agents: the first
migration address that answers, the next when one does not, a refusal when none does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.server.agents import AgentConnector
from qmotion.server.db import Database, Vm
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import Guest, Link, World, _facts

MIB = 1 << 20


def _facts_with_networks(host: str) -> dict[str, Any]:
    n = host.removeprefix("h")
    return _facts() | {
        "cpus": 2,
        "tcp_rmem_max": 6 << 20,
        "migration_networks": [
            {"address": f"198.19.0.{n}", "prefixlen": 24, "ifname": "eth1", "mtu": 1500},
            {
                "address": f"198.18.0.{n}",
                "prefixlen": 24,
                "ifname": "vmbr0",
                "mtu": 1500,
                "role": "management",
            },
        ],
    }


def _world(tmp_path: Path, rtt_ms: float, guest: Guest) -> Iterator[Any]:
    w = World(link=Link(bandwidth_bps=100 * MIB, rtt_ms=rtt_ms))
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    w.register_hosts(db, facts=_facts_with_networks)
    w.add_running_vm(db, "vm1", "h1", guest=guest)
    yield w, db
    db.engine.dispose()


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[tuple[World, Database]]:
    yield from _world(tmp_path, 0.2, Guest(resident_bytes=64 * MIB))


@pytest.fixture
def far(tmp_path: Path) -> Iterator[tuple[World, Database]]:
    # A hot set the plan would carry with xbzrle on one stream.
    yield from _world(tmp_path, 150.0, Guest(resident_bytes=128 * MIB, hot_bytes=48 * MIB))


def _migrate(w: World, db: Database) -> TaskOut:
    async def main() -> TaskOut:
        runner = TaskRunner(
            db, Inventory(db, w.connector()), clock=w.clock.monotonic, sleep=w.sleep
        )
        task = await runner.submit_migration("vm1", MigrateRequest(to="h2"))
        return await w.run_to_end(runner, task)

    return asyncio.run(main())


def _host_of_vm(db: Database) -> str:
    with db.session() as s:
        return s.query(Vm).filter_by(name="vm1").one().host.name


def test_the_stream_takes_the_migration_network(lan: tuple[World, Database]) -> None:
    w, db = lan
    task = _migrate(w, db)
    assert task.state == TaskState.SUCCEEDED, task.error
    assert task.result is not None and task.result.migration_address == "198.19.0.2"
    assert w.uris == [("h1", "tcp:198.19.0.2:4444")]
    assert task.result.streams == 1  # a LAN, plaintext: one classic stream
    assert w.running_copies("vm1") == ["h2"]


def test_an_address_that_does_not_answer_falls_back_to_the_next(
    lan: tuple[World, Database],
) -> None:
    w, db = lan
    w.dead_addresses = {"198.19.0.2"}
    task = _migrate(w, db)
    assert task.state == TaskState.SUCCEEDED, task.error
    r = task.result
    assert r is not None and r.migration_address == "198.18.0.2"
    assert w.uris == [("h1", "tcp:198.18.0.2:4444")]
    assert any(x.startswith("fell back from 198.19.0.2") for x in r.warnings), r.warnings


def test_no_address_answering_refuses_with_nothing_changed(lan: tuple[World, Database]) -> None:
    w, db = lan
    w.dead_addresses = {"198.19.0.2", "198.18.0.2"}
    task = _migrate(w, db)
    assert task.state == TaskState.FAILED
    assert task.error is not None and "reaches no migration address of h2" in task.error
    # Refused before anything changed: no destination was prepared, no stream started.
    assert "vm1" not in w.vms["h2"] and w.uris == []
    assert w.running_copies("vm1") == ["h1"] and _host_of_vm(db) == "h1"


def test_a_long_path_gets_streams_and_no_xbzrle(far: tuple[World, Database]) -> None:
    w, db = far
    task = _migrate(w, db)
    assert task.state == TaskState.SUCCEEDED, task.error
    assert task.result is not None and task.result.streams == 8
    assert any("xbzrle left off" in x for x in task.result.warnings), task.result.warnings
    for host, kind, params in w.params_received:
        # QEMU refuses xbzrle with multifd: never asked for together, on either side.
        assert params.multifd_channels == 8, (host, kind)
        assert params.xbzrle_cache_bytes == 0, (host, kind)


class ProbeGate:
    """Holds the route probe (outside the world's lock) until the destination is asked to
    prepare, for up to 5 s: ``overlapped`` says whether it was asked meanwhile."""

    def __init__(self, w: World) -> None:
        self.w, self.armed = w, False
        self.prepared = threading.Event()
        self.overlapped: list[bool] = []

    def connector(self) -> AgentConnector:
        def handler(url: str) -> Callable[[httpx.Request], httpx.Response]:
            inner = self.w._handler(url)

            def handle(request: httpx.Request) -> httpx.Response:
                if request.url.path == "/v1/migrations/incoming":
                    self.prepared.set()
                elif request.url.path == "/v1/net/probe" and self.armed:
                    self.armed = False
                    self.overlapped.append(self.prepared.wait(5.0))
                return inner(request)

            return handle

        return AgentConnector(transport=lambda url: httpx.MockTransport(handler(url)))


def _moves(
    w: World, db: Database, *hops: tuple[str, set[str]], gate: ProbeGate | None = None
) -> list[TaskOut]:
    """vm1 migrated along ``hops`` (destination, the addresses dead from then on); each
    task's own requests are counted from ``w.requests`` by the caller. ``gate``: the last
    hop's route probe is held by it."""

    async def main() -> list[TaskOut]:
        connector = gate.connector() if gate is not None else w.connector()
        runner = TaskRunner(db, Inventory(db, connector), clock=w.clock.monotonic, sleep=w.sleep)
        done = []
        for i, (to, dead) in enumerate(hops):
            w.dead_addresses = dead
            if gate is not None and i == len(hops) - 1:
                gate.prepared.clear()
                gate.armed = True
            task = await runner.submit_migration("vm1", MigrateRequest(to=to))
            done.append(await w.run_to_end(runner, task))
        return done

    return asyncio.run(main())


def _prepared_on_h2(w: World, since: int) -> int:
    return sum(
        1
        for host, method, path in w.requests[since:]
        if host == "h2" and method == "POST" and path == "/v1/migrations/incoming"
    )


def test_a_known_path_is_prepared_with_its_last_route_and_checked_again(
    lan: tuple[World, Database],
) -> None:
    """The third move goes h1 -> h2 again: the destination is prepared with the route the
    first one took while the route is measured again (the probe is held until the
    destination is asked: it is asked meanwhile, not after)."""
    w, db = lan
    first, back = _moves(w, db, ("h2", set()), ("h1", set()))
    assert first.state == back.state == TaskState.SUCCEEDED
    since = len(w.requests)
    gate = ProbeGate(w)
    (again,) = _moves(w, db, ("h2", set()), gate=gate)
    assert again.state == TaskState.SUCCEEDED, again.error
    assert gate.overlapped == [True]
    assert again.result is not None and again.result.migration_address == "198.19.0.2"
    assert _prepared_on_h2(w, since) == 1
    assert ("h1", "POST", "/v1/net/probe") in w.requests[since:]
    assert w.running_copies("vm1") == ["h2"] and _host_of_vm(db) == "h2"


def test_a_path_that_changed_since_its_last_move_is_prepared_again(
    lan: tuple[World, Database],
) -> None:
    """The migration network to h2 went down after the first move: the destination,
    prepared on the old route, is removed and prepared again on the one that answers; the
    stream goes there and one copy runs."""
    w, db = lan
    _moves(w, db, ("h2", set()), ("h1", set()))
    since = len(w.requests)
    (again,) = _moves(w, db, ("h2", {"198.19.0.2"}))
    assert again.state == TaskState.SUCCEEDED, again.error
    r = again.result
    assert r is not None and r.migration_address == "198.18.0.2"
    assert w.uris[-1] == ("h1", "tcp:198.18.0.2:4444")
    assert any("changed since the last migration" in x for x in r.warnings), r.warnings
    assert _prepared_on_h2(w, since) == 2
    assert w.running_copies("vm1") == ["h2"] and _host_of_vm(db) == "h2"


def test_a_known_path_that_no_longer_answers_fails_and_leaves_nothing_behind(
    lan: tuple[World, Database],
) -> None:
    """No address of h2 answers any more: the destination prepared on the last route is
    removed (it held nothing), no stream was sent, the VM runs on h1 and the inventory
    says so."""
    w, db = lan
    _moves(w, db, ("h2", set()), ("h1", set()))
    streams, since = len(w.uris), len(w.requests)
    (again,) = _moves(w, db, ("h2", {"198.19.0.2", "198.18.0.2"}))
    assert again.state == TaskState.FAILED
    assert _prepared_on_h2(w, since) == 1  # prepared on the last route, then removed
    assert again.error is not None and "reaches no migration address of h2" in again.error
    assert "vm1" not in w.vms["h2"] and len(w.uris) == streams
    assert again.result is not None and again.result.leftovers == []
    assert w.running_copies("vm1") == ["h1"] and _host_of_vm(db) == "h1"


def test_a_known_paths_report_carries_the_rtt_measured_now(lan: tuple[World, Database]) -> None:
    """The path got slower (0.2 -> 0.6 ms) since its last move, on the same address: the
    destination prepared with the last route is kept (a LAN either way), and the prediction
    the next move reads its route from has the RTT measured now, not the first move's."""
    w, db = lan
    _moves(w, db, ("h2", set()), ("h1", set()))
    since = len(w.requests)
    w.link.rtt_ms = 0.6
    (again,) = _moves(w, db, ("h2", set()))
    assert again.state == TaskState.SUCCEEDED, again.error
    r = again.result
    assert r is not None and r.prediction is not None and r.prediction.rtt_ms == 0.6
    assert r.migration_address == "198.19.0.2" and _prepared_on_h2(w, since) == 1


def test_a_known_long_path_keeps_its_destination_for_one_stream_more_or_less(
    far: tuple[World, Database],
) -> None:
    """150 ms, 8 streams on the first move. The path then measures 120 ms, where its rate
    calls for 7: within one, the destination prepared with 8 is kept (both ends agree on
    it); at 5 ms the count (2) is far from 8, and the destination is prepared again."""
    w, db = far
    first, _ = _moves(w, db, ("h2", set()), ("h1", set()))
    assert first.result is not None and first.result.streams == 8
    w.link.rtt_ms = 120.0
    since = len(w.requests)
    (near,) = _moves(w, db, ("h2", set()))
    assert near.state == TaskState.SUCCEEDED, near.error
    assert near.result is not None and near.result.streams == 8
    assert near.result.prediction is not None and near.result.prediction.streams == 8
    assert _prepared_on_h2(w, since) == 1
    assert all(p.multifd_channels == 8 for _, _, p in w.params_received[-2:])
    _moves(w, db, ("h1", set()))
    w.link.rtt_ms = 5.0
    since = len(w.requests)
    (short,) = _moves(w, db, ("h2", set()))
    assert short.state == TaskState.SUCCEEDED, short.error
    r = short.result
    assert r is not None and r.streams is not None and r.streams < 7
    assert _prepared_on_h2(w, since) == 2
    assert any("changed since the last migration" in x for x in r.warnings), r.warnings
    assert w.running_copies("vm1") == ["h2"] and _host_of_vm(db) == "h2"
