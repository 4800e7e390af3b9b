"""The agent's storage vMotion (qmotion.agent.disks.storage): a whole move, and what it refuses.

A move from start through pivot to release, and the refusals that change nothing (too little
free space, a pivot out of sync, an abort after the pivot). Over the scripted QMP stand-in of
tests/unit/storage_qemu.py and real disk images (tests/unit/storage_world.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmotion.agent.disks import storage, storage_pivot
from qmotion.agent.errors import Conflict, SpecRejected
from qmotion.api.storage import MirrorRequest
from qmotion.api.vm import Disk
from tests.unit import storage_world
from tests.unit.storage_world import VM, World, clocked, files_under, qemu_img, started_and_ready

world = storage_world.world  # the shared fixture: pytest finds it under this name


def test_two_disks_are_mirrored_activated_pivoted_together_and_the_old_files_released(
    world: World,
) -> None:
    w, qemu = world, world.qemu

    async def run() -> None:
        st = await w.moves.start(VM, MirrorRequest(datastore="fast"))
        assert [(d.index, d.status, d.ready) for d in st.disks] == [
            (0, "running", False),
            (1, "running", False),
        ]
        assert w.record()["phase"] == "mirroring"
        targets = w.targets()
        assert targets == [
            w.root / "fast" / VM / "disk0.qcow2",
            w.root / "fast" / VM / "disk1.qcow2",
        ]
        for source, target in zip(w.sources, targets, strict=True):
            # A fresh image (reads as zeros) of the source's size, opened by QEMU as the job's
            # target; the guest still runs on the source.
            src = qemu_img("info", "-U", "--output=json", str(source))
            dst = qemu_img("info", "-U", "--output=json", str(target))
            assert (dst["format"], dst["virtual-size"]) == ("qcow2", src["virtual-size"])
        assert [(j.id, j.source, j.copy_mode) for j in qemu.jobs.values()] == [
            ("qm-mirror-0", "disk0", "background"),
            ("qm-mirror-1", "disk1", "background"),
        ]
        assert qemu.device_nodes() == ["disk0", "disk1"]
        # The copy is written past the page cache (its speed then steady).
        target_files = [qemu.nodes[qemu.nodes[j.target].file or ""] for j in qemu.jobs.values()]
        assert [f.direct for f in target_files] == [True, True]

        qemu.ticks(2)
        st = await w.moves.status(VM)
        assert st.phase == "ready" and all(d.ready for d in st.disks)
        assert st.remaining_bytes == 0 and not st.synced  # in sync, but not yet write-blocking

        st = await w.moves.activate(VM)
        assert st.copy_mode == "write-blocking" and st.synced
        assert [j.copy_mode for j in qemu.jobs.values()] == ["write-blocking"] * 2
        assert w.record()["copy_mode"] == "write-blocking"
        qemu.tick()
        st = await w.moves.status(VM)
        assert all(d.actively_synced for d in st.disks)

        target_nodes = [j.target for j in qemu.jobs.values()]
        st = await clocked(qemu, w.moves.pivot(VM))
        assert st.phase == "pivoted", st
        assert qemu.device_nodes() == target_nodes  # both devices switched
        # ... and the VM runs on them as on the disks it starts with: through the page cache.
        assert [f.direct for f in target_files] == [False, False]
        assert qemu.sent("job-finalize") == [{"id": "qm-mirror-0"}, {"id": "qm-mirror-1"}]
        assert qemu.jobs == {}  # dismissed
        for old in ("disk0", "file0", "disk1", "file1"):
            assert old not in qemu.nodes, f"old node {old} still open"
        new_disks = [
            Disk(datastore="fast", path=f"{VM}/disk0.qcow2", bootable=True),
            Disk(datastore="fast", path=f"{VM}/disk1.qcow2"),
        ]
        assert w.host.spec(VM).disks == new_disks
        assert w.saved_spec().disks == new_disks  # persisted: a restart uses the targets
        assert w.record()["phase"] == "pivoted"
        assert all(s.is_file() for s in w.sources), "old files are removed only by release"

        before = files_under(w.root / "slow") | files_under(w.root / "fast")
        st = await w.moves.release(VM)
        assert st.phase == "released" and st.leftovers == []
        assert sorted(st.removed) == sorted(str(s) for s in w.sources)
        after = files_under(w.root / "slow") | files_under(w.root / "fast")
        assert before - after == set(w.sources)  # both old files, and nothing else
        assert w.bystander.is_file() and all(t.is_file() for t in targets)
        assert not w.record_file.exists()  # the move is over

    asyncio.run(run())


def test_a_file_system_without_direct_io_copies_through_the_page_cache(world: World) -> None:
    """O_DIRECT refused (file-posix's EINVAL at open): the targets are opened cached, the
    move completes the same, and the pivot has nothing to reopen."""
    w, qemu = world, world.qemu
    qemu.no_direct_io = True

    async def run() -> None:
        await started_and_ready(w)
        files = [qemu.nodes[qemu.nodes[j.target].file or ""] for j in qemu.jobs.values()]
        assert [f.direct for f in files] == [False, False]
        assert [d["direct"] for d in w.record()["disks"]] == [False, False]
        await w.moves.activate(VM)
        qemu.tick()
        st = await clocked(qemu, w.moves.pivot(VM))
        assert st.phase == "pivoted", st
        assert qemu.sent("blockdev-reopen") == []
        assert [d.datastore for d in w.saved_spec().disks] == ["fast", "fast"]

    asyncio.run(run())


def test_the_direct_targets_are_reopened_cached_in_one_drain_after_the_agents_flush(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One blockdev-reopen for both disks, naming what blockdev-add named (QEMU refuses an
    option left out), and only once the agent's own fdatasync of the targets is done (the
    reopen flushes inside QEMU's main loop, the guest's devices waiting)."""
    w, qemu = world, world.qemu
    synced_at: list[tuple[int, list[str]]] = []  # (QMP commands sent by then, files)
    real_sync = storage_pivot.Pivots._sync

    def sync(self: storage_pivot.Pivots, disks: list[Disk]) -> None:
        real_sync(self, disks)
        synced_at.append((len(qemu.commands), [d.datastore for d in disks]))  # done by then

    monkeypatch.setattr(storage_pivot.Pivots, "_sync", sync)

    async def run() -> None:
        await started_and_ready(w)
        await w.moves.activate(VM)
        qemu.tick()
        st = await clocked(qemu, w.moves.pivot(VM))
        assert st.phase == "pivoted", st
        sent = [c for c, _ in qemu.commands]
        reopen_at = sent.index("blockdev-reopen")
        assert sent.count("blockdev-reopen") == 1 and reopen_at < sent.index("job-complete")
        targets_synced = next(n for n, where in synced_at if where == ["fast", "fast"])
        assert targets_synced <= reopen_at
        (reopen,) = qemu.sent("blockdev-reopen")
        assert [o["cache"] for o in reopen["options"]] == [{"direct": False}] * 2

    asyncio.run(run())


def test_a_pivot_while_a_job_is_not_in_sync_is_refused_and_switches_nothing(
    world: World,
) -> None:
    w, qemu = world, world.qemu

    async def run() -> None:
        await w.moves.start(VM, MirrorRequest(datastore="fast"))
        qemu.stalled.add("qm-mirror-1")
        qemu.ticks(3)
        assert [j.status for j in qemu.jobs.values()] == ["ready", "running"]
        with pytest.raises(Conflict, match=r"\[1\]"):
            await clocked(qemu, w.moves.pivot(VM))
        assert qemu.sent("job-complete") == [] and qemu.sent("job-cancel") == []
        assert qemu.device_nodes() == ["disk0", "disk1"]
        assert [j.status for j in qemu.jobs.values()] == ["ready", "running"]
        assert w.record()["phase"] == "mirroring"
        assert [d.datastore for d in w.saved_spec().disks] == ["slow", "slow"]

        # Refused is not failed: once in sync, the same move pivots.
        qemu.stalled.clear()
        qemu.ticks(2)
        st = await clocked(qemu, w.moves.pivot(VM))
        assert st.phase == "pivoted"
        assert [d.datastore for d in w.saved_spec().disks] == ["fast", "fast"]

    asyncio.run(run())


def test_abort_after_the_pivot_is_refused_and_deletes_nothing(world: World) -> None:
    w, qemu = world, world.qemu

    async def run() -> None:
        await started_and_ready(w)
        await clocked(qemu, w.moves.pivot(VM))
        targets = w.targets()
        files = files_under(w.root)
        sent = len(qemu.commands)
        with pytest.raises(Conflict, match="already switched") as err:
            await clocked(qemu, w.moves.abort(VM))
        assert err.value.code == "already_switched"  # the manager's rollback goes forward on it
        assert files_under(w.root) == files
        assert all(p.is_file() for p in [*w.sources, *targets])
        changes = {"job-cancel", "job-dismiss", "blockdev-del", "blockdev-add", "job-finalize"}
        assert [c for c, _ in qemu.commands[sent:] if c in changes] == []
        assert qemu.device_nodes() == [j["target_node"] for j in w.record()["disks"]]
        assert w.record()["phase"] == "pivoted"
        st = await w.moves.release(VM)  # what is right after a pivot still works
        assert sorted(st.removed) == sorted(str(s) for s in w.sources)

    asyncio.run(run())


def test_too_little_free_space_is_refused_naming_the_datastore_and_creates_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, qemu = world, world.qemu
    asked: list[Path] = []

    def free(path: Path) -> int:
        asked.append(path)
        return 64 << 10  # less than the two images' metadata

    monkeypatch.setattr(storage, "free_bytes", free)
    with pytest.raises(SpecRejected) as err:
        asyncio.run(w.moves.start(VM, MirrorRequest(datastore="fast")))
    assert err.value.field == "datastore" and err.value.vm == VM
    assert "fast" in err.value.message
    assert asked == [w.root / "fast"]
    assert files_under(w.root / "fast") == set() and list((w.root / "fast").iterdir()) == []
    assert not w.record_file.exists()
    assert qemu.sent("blockdev-add") == [] and qemu.sent("blockdev-mirror") == []
    assert qemu.jobs == {}
