"""The source agent's half of a shared-nothing migration (qmotion.agent.disks.nbd.NbdMirrors) and
the destination's empty disks (IncomingDisks), over the scripted QMP stand-in of
storage_qemu, taught what this needs of QEMU 10.0:

- ``blockdev-add`` of an ``nbd`` client node (BlockdevOptionsNbd's arguments only; ``server``
  an inet address whose port is a string);
- ``block-job-cancel``: on a ready mirror without ``force`` the job *completes* (its last
  dirty blocks copied, nothing pivoted, no error; mirror_cancel returns false for a soft
  cancel of a ready job); with ``force``, or on a job not ready, it is cancelled ('aborting',
  then 'concluded' with "Operation canceled");
- ``object-add``/``object-del`` of the TLS credentials."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

import pytest

from qmotion.agent.disks import nbd, nbd_incoming
from qmotion.agent.disks.nbd import NbdMirrors
from qmotion.agent.disks.nbd_incoming import IncomingDisks
from qmotion.agent.errors import Conflict, SpecRejected
from qmotion.api.storage import CopyDisk, DiskCopyPlan, NbdExport, NbdMirrorRequest
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor.errors import QmpError
from qmotion.hypervisor.monitor import Monitor

from .storage_qemu import CANCELED, Job, Node, ScriptedQemu
from .storage_world import VM, Host, qemu_img

NBD_ARGS = {"driver", "node-name", "server", "export", "tls-creds", "tls-hostname"}


class NbdQemu(ScriptedQemu):
    def __init__(self, disks: list[tuple[Path, str]]) -> None:
        super().__init__(disks)
        self.objects: set[str] = set()
        self.fail_completion: dict[str, str] = {}  # job -> error its completion ends with
        self.run_state = "running"

    async def status(self) -> str:
        return self.run_state

    def tick(self) -> None:
        for job in list(self.jobs.values()):
            if job.status == "completing":
                # The last dirty blocks copied; the device keeps its node (no pivot).
                job.error = self.fail_completion.get(job.id)
                self._conclude(job)
        super().tick()

    def _qmp_blockdev_add(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("driver") != "nbd":
            return super()._qmp_blockdev_add(command, args)
        self._expect(command, args, NBD_ARGS)
        server = args["server"]
        assert server["type"] == "inet" and isinstance(server["port"], str), server
        if "tls-creds" in args and args["tls-creds"] not in self.objects:
            raise QmpError(command, "GenericError", f"No TLS credentials '{args['tls-creds']}'")
        name = str(args["node-name"])
        if name in self.nodes:
            raise QmpError(command, "GenericError", f"Duplicate nodes with node-name='{name}'")
        uri = f"nbd://{server['host']}:{server['port']}/{args['export']}"
        self.nodes[name] = Node(name, "nbd", uri)
        return {}

    def _qmp_block_job_cancel(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(command, str(args["device"]), "cancel")
        if job.status == "ready" and not args.get("force", False):
            job.status = "completing"
        else:
            job.error = CANCELED
            job.status = "aborting"
        return {}

    def _qmp_object_add(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if args["id"] in self.objects:
            raise QmpError(command, "GenericError", f"attempt to add duplicate ID {args['id']}")
        self.objects.add(str(args["id"]))
        return {}

    def _qmp_object_del(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if args["id"] not in self.objects:
            raise QmpError(command, "GenericError", f"object '{args['id']}' not found")
        self.objects.discard(str(args["id"]))
        return {}


@dataclass
class FakeTls:
    qemu_dir: Path
    ready: bool = True


@dataclass
class Source:
    root: Path
    qemu: NbdQemu
    host: Host
    mirrors: NbdMirrors
    sources: list[Path]


@pytest.fixture
def source(tmp_path: Path) -> Source:
    (tmp_path / "fast").mkdir()
    sources = [tmp_path / "slow" / VM / "disk0.qcow2", tmp_path / "slow" / VM / "data.qcow2"]
    sources[0].parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", str(sources[0]), "64M")
    qemu_img("create", "-q", "-f", "qcow2", str(sources[1]), "32M")
    spec = VmSpec(
        name=VM,
        memory=256,
        disks=[
            Disk(datastore="slow", path=f"{VM}/disk0.qcow2", bootable=True),
            Disk(datastore="slow", path=f"{VM}/data.qcow2"),
        ],
    )
    vm_dir = tmp_path / "state" / "vms" / VM
    vm_dir.mkdir(parents=True)
    (vm_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    qemu = NbdQemu([(p, "qcow2") for p in sources])
    host = Host(tmp_path, qemu)
    tls = FakeTls(tmp_path / "tls")
    mirrors = NbdMirrors(host, tls)  # type: ignore[arg-type]
    return Source(tmp_path, qemu, host, mirrors, sources)


def request(tls: bool = True) -> NbdMirrorRequest:
    return NbdMirrorRequest(
        host=IPv4Address("198.18.2.12"),
        port=40123,
        exports=[NbdExport(index=0, name="disk0"), NbdExport(index=1, name="disk1")],
        targets=[
            Disk(datastore="fast", path=f"{VM}/disk0.qcow2", bootable=True),
            Disk(datastore="fast", path=f"{VM}/disk1.qcow2"),
        ],
        tls=tls,
        tls_hostname="h2",
    )


def as_monitor(qemu: NbdQemu) -> Monitor:
    """The stand-in where the agent takes a Monitor (it answers the same calls)."""
    return cast(Monitor, qemu)


def jobs(qemu: NbdQemu) -> dict[str, Job]:
    return {j: qemu.jobs[j] for j in sorted(qemu.jobs)}


def test_the_disks_are_mirrored_into_the_exports_and_end_in_sync_without_pivoting(
    source: Source,
) -> None:
    s, qemu = source, source.qemu

    async def run() -> None:
        st = await s.mirrors.start(VM, request())
        assert st.phase == "mirroring" and st.copy_mode == "background"
        # One NBD client per export, over TLS, named for the destination's certificate.
        clients = [a for a in qemu.sent("blockdev-add") if a["driver"] == "nbd"]
        assert [(c["export"], c["server"]["port"], c["tls-hostname"]) for c in clients] == [
            ("disk0", "40123", "h2"),
            ("disk1", "40123", "h2"),
        ]
        assert [(j.source, qemu.nodes[j.target].drv) for j in jobs(qemu).values()] == [
            ("disk0", "nbd"),
            ("disk1", "nbd"),
        ]
        assert not s.mirrors.copied_sources(VM)
        # Not in sync yet: the switchover must not go ahead.
        assert "not in sync" in (await s.mirrors.end_in_sync(VM, as_monitor(qemu)) or "")
        assert all(j.status == "running" for j in qemu.jobs.values())

        qemu.ticks(2)
        st = await s.mirrors.status(VM)
        # In sync: from now on a guest write completes only once the destination has it.
        assert st.phase == "ready" and st.copy_mode == "write-blocking"
        assert [j.copy_mode for j in qemu.jobs.values()] == ["write-blocking"] * 2
        qemu.tick()
        st = await s.mirrors.status(VM)
        assert st.synced and all(d.actively_synced for d in st.disks)

        async def clock() -> None:
            while True:
                await asyncio.sleep(0.002)
                qemu.tick()

        ticking = asyncio.create_task(clock())
        try:
            assert await s.mirrors.end_in_sync(VM, as_monitor(qemu)) is None
        finally:
            ticking.cancel()
        # Completed, not cancelled, and the guest still runs on its own disks.
        assert [(j.status, j.error) for j in qemu.jobs.values()] == [("concluded", None)] * 2
        assert [c for c, a in qemu.commands if c == "block-job-cancel"] == ["block-job-cancel"] * 2
        assert all("force" not in a for a in qemu.sent("block-job-cancel"))
        assert qemu.device_nodes() == ["disk0", "disk1"]
        assert not s.mirrors.active(VM)
        # The source files are the ones release removes once the destination runs.
        assert s.mirrors.copied_sources(VM) == list(s.host.spec(VM).disks)

        await s.mirrors.after_migration(VM, completed=True)
        assert qemu.jobs == {} and not [n for n in qemu.nodes.values() if n.drv == "nbd"]
        assert qemu.objects == set()

    asyncio.run(run())


def test_a_mirror_that_fails_while_ending_cancels_the_switchover(source: Source) -> None:
    s, qemu = source, source.qemu

    async def run() -> None:
        await s.mirrors.start(VM, request(tls=False))
        qemu.ticks(2)
        await s.mirrors.status(VM)
        qemu.fail_completion["qm-nbd-1"] = "Input/output error"
        task = asyncio.create_task(s.mirrors.end_in_sync(VM, as_monitor(qemu)))
        while not task.done():
            await asyncio.sleep(0.002)
            qemu.tick()
        assert "Input/output error" in (task.result() or "")
        # Not completed: release must not take the source's files.
        assert s.mirrors.copied_sources(VM) == []
        st = await s.mirrors.abort(VM)
        assert st.phase == "aborted"
        assert not [n for n in qemu.nodes.values() if n.drv == "nbd"] and qemu.jobs == {}

    asyncio.run(run())


def test_a_copy_whose_migration_then_failed_is_void(source: Source) -> None:
    """Ended in sync at pre-switchover, then the stream failed: the guest runs on here and
    writes again, so no later release may take these files for copied ones."""
    s, qemu = source, source.qemu

    async def run() -> None:
        await s.mirrors.start(VM, request(tls=False))
        qemu.ticks(3)
        await s.mirrors.status(VM)
        task = asyncio.create_task(s.mirrors.end_in_sync(VM, as_monitor(qemu)))
        while not task.done():
            await asyncio.sleep(0.002)
            qemu.tick()
        assert task.result() is None and s.mirrors.copied_sources(VM)
        await s.mirrors.after_migration(VM, completed=False)
        assert s.mirrors.load(VM) is None and s.mirrors.copied_sources(VM) == []
        assert qemu.jobs == {} and not [n for n in qemu.nodes.values() if n.drv == "nbd"]

    asyncio.run(run())


def test_abort_cancels_a_ready_mirror_instead_of_completing_it(source: Source) -> None:
    s, qemu = source, source.qemu

    async def run() -> None:
        await s.mirrors.start(VM, request())
        qemu.ticks(2)
        task = asyncio.create_task(s.mirrors.abort(VM))
        while not task.done():
            await asyncio.sleep(0.002)
            qemu.tick()
        assert task.result().phase == "aborted"
        assert all(a.get("force") is True for a in qemu.sent("block-job-cancel"))
        assert qemu.jobs == {} and qemu.objects == set()
        assert qemu.device_nodes() == ["disk0", "disk1"]
        assert s.mirrors.load(VM) is None and s.mirrors.copied_sources(VM) == []
        # Idempotent: asked again (an answer lost), it is still aborted.
        assert (await s.mirrors.abort(VM)).phase == "aborted"

    asyncio.run(run())


def test_a_copy_that_stops_gaining_goes_write_blocking(
    source: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, qemu = source, source.qemu
    monkeypatch.setattr(nbd, "STALL_SWITCH_S", 0.0)

    async def run() -> None:
        await s.mirrors.start(VM, request(tls=False))
        qemu.tick()  # half copied: gaining
        gaining = await s.mirrors.status(VM)
        assert gaining.copy_mode == "background" and gaining.remaining_bytes > 0
        qemu.stalled = {"qm-nbd-0", "qm-nbd-1"}  # the guest writes as fast as it copies
        stalled = await s.mirrors.status(VM)
        assert stalled.copy_mode == "write-blocking" and stalled.phase == "mirroring"
        assert [j.copy_mode for j in qemu.jobs.values()] == ["write-blocking"] * 2

    asyncio.run(run())


def test_a_second_mirror_is_refused_and_a_failed_ones_leftovers_are_cleared(
    source: Source,
) -> None:
    s, qemu = source, source.qemu

    async def run() -> None:
        await s.mirrors.start(VM, request(tls=False))
        # The same request again (its answer was lost): how it stands, nothing started twice.
        again = await s.mirrors.start(VM, request(tls=False))
        assert again.phase == "mirroring" and len(qemu.sent("blockdev-mirror")) == 2
        other = request(tls=False).model_copy(update={"port": 40999})
        with pytest.raises(Conflict, match="already mirroring"):
            await s.mirrors.start(VM, other)
        # The destination went away: its jobs fail, the record says so.
        for job in qemu.jobs.values():
            job.error, job.status = "Connection reset by peer", "concluded"
        st = await s.mirrors.status(VM)
        assert st.phase == "failed" and "Connection reset" in (st.error or "")
        # A new attempt first clears what the failed one left, then starts afresh.
        task = asyncio.create_task(s.mirrors.start(VM, request(tls=False)))
        while not task.done():
            await asyncio.sleep(0.002)
            qemu.tick()
        assert task.result().phase == "mirroring"
        assert sorted(qemu.jobs) == ["qm-nbd-0", "qm-nbd-1"]
        assert all(j.status == "running" for j in qemu.jobs.values())

    asyncio.run(run())


def test_the_destination_creates_empty_disks_and_refuses_without_room(
    source: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = source
    disks = IncomingDisks(s.host)  # type: ignore[arg-type]
    spec = s.host.spec(VM)
    plan = DiskCopyPlan(
        datastore="fast",
        format="raw",
        disks=[
            CopyDisk(index=0, virtual_size=64 << 20, allocated_bytes=1 << 20),
            CopyDisk(index=1, virtual_size=32 << 20, allocated_bytes=1 << 20),
        ],
    )

    async def run() -> None:
        new, made = await disks.create(spec, plan)
        assert [d.datastore for d in new.disks] == ["fast", "fast"]
        assert [d.format for d in made] == ["raw", "raw"]
        for d, size in zip(made, (64 << 20, 32 << 20), strict=True):
            info = qemu_img("info", "--output=json", str(s.root / "fast" / d.path))
            assert (info["format"], info["virtual-size"]) == ("raw", size)
            assert info["actual-size"] < 1 << 20  # empty: nothing written, nothing allocated
        assert new.disks[0].bootable and spec.disks[0].datastore == "slow"
        disks.remove(made)
        assert not [p for p in (s.root / "fast").rglob("*") if p.is_file()]

        monkeypatch.setattr(nbd_incoming, "free_bytes", lambda _path: 1 << 20)
        with pytest.raises(SpecRejected, match="MiB free") as refused:
            await disks.create(spec, plan)
        assert refused.value.field == "datastore"
        with pytest.raises(SpecRejected, match="not available"):
            await disks.create(spec, plan.model_copy(update={"datastore": "nosuch"}))
        assert not [p for p in (s.root / "fast").rglob("*") if p.is_file()]

    asyncio.run(run())
