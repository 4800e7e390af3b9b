"""The agent's storage vMotion when it fails: a job failing, an agent restarted or killed mid-move.

All or none: the VM ends on its old disks or on the new ones, never split; abort removes what
the move created, from its record after a restart. Over tests/unit/storage_qemu.py and
tests/unit/storage_world.py."""

from __future__ import annotations

import asyncio

import pytest

from qmotion.agent.errors import OperationFailed
from qmotion.api.storage import MirrorRequest
from tests.unit import storage_world
from tests.unit.storage_qemu import AgentKilled
from tests.unit.storage_world import VM, World, clocked, started_and_ready

world = storage_world.world  # the shared fixture: pytest finds it under this name


def test_a_job_failing_before_pending_switches_no_disk_and_abort_removes_both_targets(
    world: World,
) -> None:
    w, qemu = world, world.qemu

    async def run() -> None:
        await started_and_ready(w)
        await w.moves.activate(VM)
        targets = w.targets()
        target_nodes = [j.target for j in qemu.jobs.values()]
        # disk 0's job reaches pending first; disk 1's then fails in its last sync.
        qemu.fail_before_pending["qm-mirror-1"] = "No space left on device"
        with pytest.raises(OperationFailed, match="none was"):
            await clocked(qemu, w.moves.pivot(VM))

        assert qemu.device_nodes() == ["disk0", "disk1"], "a disk was switched"
        assert qemu.sent("job-finalize") == []
        assert qemu.sent("job-cancel") == [{"id": "qm-mirror-0"}]  # the other had failed
        assert {a["id"] for a in qemu.sent("job-dismiss")} == {"qm-mirror-0", "qm-mirror-1"}
        assert qemu.jobs == {}
        assert w.host.spec(VM).disks[0].datastore == "slow"
        assert [d.datastore for d in w.saved_spec().disks] == ["slow", "slow"]
        rec = w.record()
        assert rec["phase"] == "failed" and "No space left on device" in rec["error"]
        assert (await w.moves.status(VM)).phase == "failed"

        st = await clocked(qemu, w.moves.abort(VM))
        assert st.phase == "aborted"
        assert sorted(st.removed) == sorted(str(t) for t in targets) and st.leftovers == []
        assert not any(t.exists() for t in targets)
        assert not (w.root / "fast" / VM).exists()  # the VM's emptied folder too
        assert all(s.is_file() for s in w.sources) and w.bystander.is_file()
        assert not any(n in qemu.nodes for n in target_nodes), "target nodes left open"
        assert {"disk0", "file0", "disk1", "file1"} <= set(qemu.nodes)
        assert not w.record_file.exists()

    asyncio.run(run())


@pytest.mark.parametrize("case", ["mirroring", "mirroring, QEMU gone too", "died in start"])
def test_an_agent_restarted_mid_mirror_still_aborts_from_its_record(
    world: World, case: str
) -> None:
    w, qemu = world, world.qemu
    qemu_alive = "gone" not in case

    async def run() -> None:
        if case == "died in start":
            # Both targets created and opened, disk 1's mirror not yet started.
            qemu.agent_dies_at = ("blockdev-mirror", 2)
            with pytest.raises(AgentKilled):
                await w.moves.start(VM, MirrorRequest(datastore="fast"))
        else:
            await w.moves.start(VM, MirrorRequest(datastore="fast"))
            qemu.tick()
        jobs = sorted(qemu.jobs)
        targets = w.targets()
        target_nodes = [
            n for d in w.record()["disks"] for n in (d["target_node"], d["target_file_node"])
        ]
        assert all(t.is_file() for t in targets) and set(target_nodes) <= set(qemu.nodes)
        keep = w.root / "fast" / VM / "unrelated.img"  # not the move's: stays
        keep.write_bytes(b"x")

        w.restart_agent(qemu_alive=qemu_alive)  # nothing in memory: only the directory
        st = await clocked(qemu, w.moves.abort(VM))
        assert st.phase == "aborted" and st.datastore == "fast"
        assert sorted(st.removed) == sorted(str(t) for t in targets) and st.leftovers == []
        assert not any(t.exists() for t in targets)
        assert keep.is_file() and all(s.is_file() for s in w.sources)
        assert not w.record_file.exists()
        assert [d.datastore for d in w.saved_spec().disks] == ["slow", "slow"]
        if qemu_alive:
            assert [a["id"] for a in qemu.sent("job-cancel")] == jobs
            assert qemu.jobs == {}
            assert not any(n in qemu.nodes for n in target_nodes), "target nodes left open"
            assert qemu.device_nodes() == ["disk0", "disk1"]
        # Idempotent: a second abort (a lost answer retried) finds nothing to do.
        again = await w.moves.abort(VM)
        assert again.phase == "aborted" and again.removed == []

    asyncio.run(run())


@pytest.mark.parametrize("dies_at_finalize", [1, 2])
def test_an_agent_killed_during_the_switch_settles_it_from_qemu_all_or_none(
    world: World, dies_at_finalize: int
) -> None:
    """Killed before the first finalize (nothing switched) or between the two (one switched):
    the restarted agent asks QEMU, then finishes the switch (every job was pending) or ends
    the jobs; never a split VM, never a file QEMU runs on deleted."""
    w, qemu = world, world.qemu

    async def run() -> None:
        await started_and_ready(w)
        await clocked(qemu, w.moves.activate(VM))
        qemu.agent_dies_at = ("job-finalize", dies_at_finalize)
        with pytest.raises(AgentKilled):
            await clocked(qemu, w.moves.pivot(VM))
        assert w.record()["phase"] == "switching"
        qemu.agent_dies_at = None
        w.restart_agent()
        st = await clocked(qemu, w.moves.status(VM))
        targets = w.targets()
        if dies_at_finalize == 1:
            # Nothing had switched: the jobs end, the VM stays on its old disks.
            assert st.phase == "failed", st
            assert qemu.device_nodes() == ["disk0", "disk1"]
            assert [d.datastore for d in w.saved_spec().disks] == ["slow", "slow"]
            aborted = await clocked(qemu, w.moves.abort(VM))
            assert not any(t.exists() for t in targets) and all(s.is_file() for s in w.sources)
            assert aborted.leftovers == []
        else:
            # One had switched: the other, pending, is finalized too.
            assert st.phase == "pivoted" and st.error is None, st
            assert [d.datastore for d in w.saved_spec().disks] == ["fast", "fast"]
            assert all(n.startswith("m") for n in qemu.device_nodes()), qemu.device_nodes()
            assert qemu.jobs == {}, "a pending job left behind"
            released = await clocked(qemu, w.moves.release(VM))
            assert released.leftovers == [], released
            assert not any(s.exists() for s in w.sources) and all(t.is_file() for t in targets)

    asyncio.run(run())
