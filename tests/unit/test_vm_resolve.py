"""What an operator may do with a VM found in more than one place (issue 22, review): start
and suspend (which bring a copy to life) are refused while the VM needs attention or another
host holds a copy; stop is allowed; ``vm resolve`` clears the mark only where no other copy is
left, and ``vm resolve --keep HOST`` makes HOST's copy the VM and ends the others."""

from __future__ import annotations

from pathlib import Path

from qmotion.server.db import Database, Host
from tests.unit.manager_app import Client
from tests.unit.manager_app import run_manager as _manager
from tests.unit.test_attention import _cluster, _mark, _twin


def test_a_stale_copy_stopped_is_never_started_again_while_its_twin_runs(tmp_path: Path) -> None:
    """The review's interleaving: the task failed "switchover unconfirmed", the inventory
    names h1 (QEMU in postmigrate), h2 runs the VM. Stop is fine; a start on h1 would boot a
    second copy from the disk h2 writes to (the old code started it)."""
    world, url = _cluster(tmp_path, {"h1": ["vm0"]})
    world.vms["h1"]["vm0"].runstate = "postmigrate"
    _twin(world, "vm0", "h2", "running")

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/vm0/stop", json={"force": True})
        assert r.status_code == 200, r.text
        for verb in ("start", "suspend"):
            r = await c.post(f"/v1/vms/vm0/{verb}")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["host"] == "h2", r.text

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h2"]


def test_a_marked_vm_is_not_started_and_resolve_clears_only_a_single_copy(
    tmp_path: Path,
) -> None:
    world, url = _cluster(tmp_path, {"h1": ["vm0"]})
    world.vms["h1"]["vm0"].runstate = "gone"  # stopped, marked: where are its newest writes?
    _mark(url, "vm0", "paused in postmigrate on h1 after migration x, and no copy runs")

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/vm0/start")
        assert r.status_code == 409 and r.json()["error"]["code"] == "vm_attention", r.text
        r = await c.post("/v1/vms/vm0/resolve", json={})
        assert r.status_code == 200 and r.json()["attention"] is None, r.text
        r = await c.post("/v1/vms/vm0/start")
        assert r.status_code == 200, r.text

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h1"]


def test_resolve_keep_makes_that_copy_the_vm_and_ends_the_others(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path, {"h1": ["vm0"]})
    _twin(world, "vm0", "h2", "running")  # two running copies: nothing reconcile may pick
    _mark(url, "vm0", "runs on h1 and h2: two copies")

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/vm0/resolve", json={})
        assert r.status_code == 409 and r.json()["error"]["host"] == "h2", r.text
        r = await c.post("/v1/vms/vm0/resolve", json={"keep": "h3"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "keep", r.text
        r = await c.post("/v1/vms/vm0/resolve", json={"keep": "h2"})
        assert r.status_code == 200, r.text
        vm = r.json()
        assert (vm["host"], vm["attention"], vm["state"]) == ("h2", None, "running")

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h2"] and "vm0" not in world.vms["h1"]


def test_resolve_never_keeps_a_stopped_copy_over_one_that_runs(tmp_path: Path) -> None:
    """The paused source after a switchover and the running destination: keeping the source
    would end the copy holding the newest writes. Refused, nothing touched."""
    world, url = _cluster(tmp_path, {"h1": ["vm0"]})
    world.vms["h1"]["vm0"].runstate = "postmigrate"
    _twin(world, "vm0", "h2", "running")
    _mark(url, "vm0", "switchover unconfirmed")

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/vm0/resolve", json={"keep": "h1"})
        assert r.status_code == 409 and r.json()["error"]["host"] == "h2", r.text

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h2"]
    assert world.vms["h1"]["vm0"].runstate == "postmigrate"  # nothing touched


def test_resolve_asks_a_host_marked_down_too(tmp_path: Path) -> None:
    """A host marked down may still run a copy (its QEMU outlives its agent): asked, and a
    copy it reports counts (resolve refused); one that does not answer is not waited for
    (no route removes a host yet: a host dead for good would block every VM)."""
    world, url = _cluster(tmp_path, {"h1": ["vm0"]})
    _twin(world, "vm0", "h3", "running")
    _mark(url, "vm0", "runs on h1 and h3: two copies")
    db = Database(url)
    with db.session() as s:
        s.query(Host).filter_by(name="h3").one().state = "down"
    db.engine.dispose()

    async def test(c: Client) -> None:
        r = await c.post("/v1/vms/vm0/resolve", json={})
        assert r.status_code == 409 and r.json()["error"]["host"] == "h3", r.text
        r = await c.post("/v1/vms/vm0/start")
        assert r.status_code == 409, r.text
        r = await c.get("/v1/vms/vm0")
        assert r.json()["attention"] is not None
        world.unreachable.add("h3")
        r = await c.post("/v1/vms/vm0/resolve", json={"keep": "h1"})
        assert r.status_code == 200, r.text

    _manager(world, url, test)
    assert world.running_copies("vm0") == ["h1", "h3"]
