"""The agent's storage vMotion (qmotion.agent.disks.storage) over a scripted QMP stand-in that keeps
QEMU 10.0's block graph and job rules, and refuses what QEMU refuses:

- ``blockdev-add``: a duplicate node name, a file that does not exist, a format node over a
  file node that already has a parent, a qcow2 node over a file that is not qcow2;
- ``blockdev-del``: a node a device, an unfinished job or another node (as its ``file``) uses;
- job verbs as job.c's JobVerbTable allows them: ``block-job-change`` on running/ready jobs,
  ``job-complete`` on ready ones, ``job-finalize`` on pending ones, ``job-dismiss`` on
  concluded ones, ``job-cancel`` on any job not concluded;
- a mirror is started by ``blockdev-mirror`` (QEMU's job_start makes it 'running' at once),
  copies while the test ticks, and is 'ready' once in sync; after ``job-complete`` it goes
  'waiting' then 'pending' (auto-finalize off) or is finalized on its own (on), unless the test
  made it fail first ('concluded' with an error). Finalizing points the device at the target;
  a cancel ends 'concluded' with "Operation canceled" and switches nothing (asynchronously for a
  running or ready job: 'aborting' until the next tick).

Disk images are real files made by ``qemu-img`` in a temporary directory; the VmManager is a
small stand-in over real state directories (spec.json, the move's record)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.disks import storage
from qmotion.agent.disks.storage import RECORD, StorageMoves
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected, VmNotFound
from qmotion.api.storage import MirrorRequest
from qmotion.api.vm import Disk, VmSpec
from qmotion.hypervisor.errors import QmpError

T = TypeVar("T")

VM = "vm1"
JOB_LEN = 8 << 20  # bytes each job reports to copy; two ticks bring a job in sync
QCOW2_MAGIC = b"QFI\xfb"
CANCELED = "Operation canceled"  # strerror(ECANCELED), what query-jobs reports

# QAPI argument sets (qapi/block-core.json); QEMU refuses any other ("Parameter 'x' is
# unexpected").
FILE_ARGS = {"driver", "node-name", "filename", "cache", "aio", "locking", "read-only"}
FORMAT_ARGS = {"driver", "node-name", "file", "cache", "read-only", "discard"}
MIRROR_ARGS = {
    "job-id",
    "device",
    "target",
    "replaces",
    "sync",
    "speed",
    "granularity",
    "buf-size",
    "on-source-error",
    "on-target-error",
    "filter-node-name",
    "copy-mode",
    "auto-finalize",
    "auto-dismiss",
}
# JobVerbTable: the states in which each verb is accepted.
VERBS = {
    "cancel": {"created", "running", "paused", "ready", "standby", "waiting", "pending"},
    "change": {"running", "ready"},
    "complete": {"ready"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
}


# ---------------------------------------------------------------------- the QMP stand-in


class AgentKilled(BaseException):
    """The agent's process ends here: no handler of the agent's runs (not an Exception)."""


@dataclass
class Node:
    name: str
    drv: str
    filename: str
    file: str | None = None  # a format node's child


@dataclass
class Job:
    id: str
    source: str
    target: str
    copy_mode: str
    auto_finalize: bool
    auto_dismiss: bool
    speed: int
    status: str = "running"
    offset: int = 0
    actively_synced: bool = False
    error: str | None = None
    completing: int | None = None  # ticks since job-complete


class ScriptedQemu:
    def __init__(self, disks: list[tuple[Path, str]]) -> None:
        # As build_argv starts QEMU: -blockdev file{i}, -blockdev disk{i}, -device vblk{i}.
        self.nodes: dict[str, Node] = {}
        self.devices: dict[str, str] = {}
        for i, (path, fmt) in enumerate(disks):
            self.nodes[f"file{i}"] = Node(f"file{i}", "file", str(path))
            self.nodes[f"disk{i}"] = Node(f"disk{i}", fmt, str(path), file=f"file{i}")
            self.devices[f"vblk{i}"] = f"disk{i}"
        self.jobs: dict[str, Job] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.stalled: set[str] = set()  # jobs whose copy makes no progress
        self.fail_before_pending: dict[str, str] = {}  # job -> the error it ends with
        self.agent_dies_at: tuple[str, int] | None = None  # (command, its n-th call)

    # ------------------------------------------------------------------ test controls

    def tick(self) -> None:
        """Time passes: jobs copy, complete, fail, or finish being cancelled."""
        for job in list(self.jobs.values()):
            if job.status == "aborting":
                self._conclude(job)
            elif job.completing is not None and job.status in ("ready", "waiting"):
                job.completing += 1
                failure = self.fail_before_pending.get(job.id)
                if failure is not None and job.completing >= 3:
                    job.error = failure
                    self._conclude(job)
                elif job.completing == 1:
                    job.status = "waiting"
                elif failure is None:
                    job.status = "pending"
                    if job.auto_finalize:
                        self._finalize(job)
            elif job.status == "running" and job.id not in self.stalled:
                job.offset = min(JOB_LEN, job.offset + JOB_LEN // 2)
                if job.offset == JOB_LEN:
                    job.status = "ready"
            elif job.status == "ready" and job.copy_mode == "write-blocking":
                job.actively_synced = True

    def ticks(self, n: int) -> None:
        for _ in range(n):
            self.tick()

    def sent(self, command: str) -> list[dict[str, Any]]:
        return [args for c, args in self.commands if c == command]

    def device_nodes(self) -> list[str]:
        return [self.devices[d] for d in sorted(self.devices)]

    # ------------------------------------------------------------------ QEMU's rules

    def _users(self, name: str) -> list[str]:
        users = [f"device {d}" for d, n in self.devices.items() if n == name]
        users += [
            f"block job {j.id}"
            for j in self.jobs.values()
            if j.status != "concluded" and name in (j.source, j.target)
        ]
        users += [f"node {n.name}" for n in self.nodes.values() if n.file == name]
        return users

    def _conclude(self, job: Job) -> None:
        job.status = "concluded"
        job.completing = None
        if job.auto_dismiss:
            del self.jobs[job.id]

    def _finalize(self, job: Job) -> None:
        """mirror_exit_common: the source's parents (the device) now use the target."""
        for dev, node in self.devices.items():
            if node == job.source:
                self.devices[dev] = job.target
        self._conclude(job)

    def _job(self, command: str, job_id: str, verb: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            if command == "block-job-change":
                raise QmpError(command, "DeviceNotActive", f"Block job '{job_id}' not found")
            raise QmpError(command, "GenericError", "Job not found")
        if job.status not in VERBS[verb]:
            raise QmpError(
                command,
                "GenericError",
                f"Job '{job_id}' in state '{job.status}' cannot accept command verb '{verb}'",
            )
        return job

    def _node(self, command: str, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(
                command, "GenericError", f"Cannot find device='{name}' nor node-name='{name}'"
            )
        return node

    @staticmethod
    def _expect(command: str, args: dict[str, Any], allowed: set[str]) -> None:
        for key in args:
            if key not in allowed:
                raise QmpError(command, "GenericError", f"Parameter '{key}' is unexpected")

    @staticmethod
    def _info(node: Node) -> dict[str, Any]:
        return {
            "node-name": node.name,
            "drv": node.drv,
            "file": node.filename,
            "ro": False,
            "encrypted": False,
            "image": {"filename": node.filename, "format": node.drv},
        }

    # ------------------------------------------------------------------ QMP

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        assert not oob, f"{command} is not an out-of-band command"
        args = dict(args or {})
        if self.agent_dies_at == (command, len(self.sent(command)) + 1):
            raise AgentKilled(command)
        self.commands.append((command, args))
        await asyncio.sleep(0)  # a QMP round trip: other tasks run meanwhile
        handler = getattr(self, "_qmp_" + command.replace("-", "_"), None)
        if handler is None:
            raise AssertionError(f"unexpected QMP command {command} {args}")
        return handler(command, args)

    def _qmp_query_block(self, command: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "device": "",
                "qdev": f"/machine/peripheral/{dev}/virtio-backend",
                "locked": False,
                "removable": False,
                "type": "unknown",
                "inserted": self._info(self.nodes[self.devices[dev]]),
            }
            for dev in sorted(self.devices)
        ]

    def _qmp_query_named_block_nodes(
        self, command: str, args: dict[str, Any]
    ) -> list[dict[str, Any]]:
        assert args == {"flat": True}
        return [self._info(n) for n in self.nodes.values()]

    def _qmp_blockdev_add(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        name, driver = str(args["node-name"]), args["driver"]
        if name in self.nodes:
            raise QmpError(command, "GenericError", f"Duplicate nodes with node-name='{name}'")
        if driver == "file":
            self._expect(command, args, FILE_ARGS)
            filename = str(args["filename"])
            if not Path(filename).is_file():
                raise QmpError(
                    command,
                    "GenericError",
                    f"Could not open '{filename}': No such file or directory",
                )
            self.nodes[name] = Node(name, "file", filename)
        elif driver in ("qcow2", "raw"):
            self._expect(command, args, FORMAT_ARGS)
            if not isinstance(args["file"], str):
                raise AssertionError("the stand-in opens format nodes over named file nodes")
            child = self._node(command, args["file"])
            parents = [u for u in self._users(child.name) if u.startswith("node ")]
            if parents:
                raise QmpError(
                    command,
                    "GenericError",
                    f"Conflicts with use by {parents[0]} as 'file', which does not allow "
                    f"'write' on {child.name}",
                )
            if driver == "qcow2":
                with open(child.filename, "rb") as fh:
                    if fh.read(4) != QCOW2_MAGIC:
                        raise QmpError(command, "GenericError", "Image is not in qcow2 format")
            self.nodes[name] = Node(name, driver, child.filename, file=child.name)
        else:
            raise AssertionError(f"blockdev-add driver {driver} is not modelled")
        return {}

    def _qmp_blockdev_del(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args["node-name"])
        if name not in self.nodes:
            raise QmpError(command, "GenericError", f"Failed to find node with node-name='{name}'")
        if self._users(name):
            raise QmpError(command, "GenericError", f"Node {name} is in use")
        del self.nodes[name]
        return {}

    def _qmp_blockdev_mirror(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        self._expect(command, args, MIRROR_ARGS)
        for key in ("device", "target", "sync"):
            if key not in args:
                raise QmpError(command, "GenericError", f"Parameter '{key}' is missing")
        job_id = str(args.get("job-id", args["device"]))
        if job_id in self.jobs:
            raise QmpError(command, "GenericError", f"Job ID '{job_id}' already in use")
        source = self._node(command, str(args["device"]))
        target = self._node(command, str(args["target"]))
        for node in (source, target):
            if any(u.startswith("block job") for u in self._users(node.name)):
                raise QmpError(
                    command,
                    "GenericError",
                    f"Node '{node.name}' is busy: block device is in use by block job: mirror",
                )
        if any(u.startswith("device") for u in self._users(target.name)):
            raise QmpError(
                command,
                "GenericError",
                f"Conflicts with use by a device as 'root', which does not allow 'write' on "
                f"{target.name}",
            )
        if args["sync"] not in ("full", "top", "none"):
            raise QmpError(command, "GenericError", "Parameter 'sync' does not accept value")
        mode = args.get("copy-mode", "background")
        if mode not in ("background", "write-blocking"):
            raise QmpError(command, "GenericError", "Parameter 'copy-mode' does not accept value")
        speed = int(args.get("speed", 0))
        if speed < 0:
            raise QmpError(command, "GenericError", "Invalid parameter 'speed'")
        self.jobs[job_id] = Job(
            id=job_id,
            source=source.name,
            target=target.name,
            copy_mode=mode,
            auto_finalize=bool(args.get("auto-finalize", True)),
            auto_dismiss=bool(args.get("auto-dismiss", True)),
            speed=speed,
        )
        return {}

    def _qmp_query_jobs(self, command: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "id": j.id,
                "type": "mirror",
                "status": j.status,
                "current-progress": j.offset,
                "total-progress": JOB_LEN,
                **({"error": j.error} if j.error else {}),
            }
            for j in self.jobs.values()
        ]

    def _qmp_query_block_jobs(self, command: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "type": "mirror",
                "device": j.id,
                "len": JOB_LEN,
                "offset": j.offset,
                "busy": j.status == "running",
                "paused": False,
                "speed": j.speed,
                "io-status": "ok",
                "ready": j.status in ("ready", "standby"),
                "status": j.status,
                "auto-finalize": j.auto_finalize,
                "auto-dismiss": j.auto_dismiss,
                "actively-synced": j.actively_synced,
                **({"error": j.error} if j.error else {}),
            }
            for j in self.jobs.values()
        ]

    def _qmp_block_job_change(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(command, str(args["id"]), "change")
        if args.get("type") != "mirror":
            raise QmpError(command, "GenericError", "Job type does not match")
        mode = args.get("copy-mode")
        if mode is None or mode == job.copy_mode:
            return {}
        if mode != "write-blocking":
            raise QmpError(
                command, "GenericError", f"Change to copy mode '{mode}' is not implemented"
            )
        job.copy_mode = mode
        return {}

    def _qmp_job_complete(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(command, str(args["id"]), "complete")
        if job.completing is None:
            job.completing = 0
        return {}

    def _qmp_job_finalize(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        self._finalize(self._job(command, str(args["id"]), "finalize"))
        return {}

    def _qmp_job_cancel(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(command, str(args["id"]), "cancel")
        job.error = CANCELED
        if job.status in ("waiting", "pending"):
            self._conclude(job)  # job_completed_txn_abort, at once
        else:
            job.status = "aborting"  # the job's coroutine notices on its next iteration
        return {}

    def _qmp_job_dismiss(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        job = self._job(command, str(args["id"]), "dismiss")
        del self.jobs[job.id]
        return {}


# ---------------------------------------------------------------------- the VmManager stand-in


class Host:
    """What StorageMoves uses of VmManager, over real state directories: a new Host over the
    same directory is an agent restarted (it reads the definitions back)."""

    def __init__(self, root: Path, qemu: ScriptedQemu | None) -> None:
        self.config = AgentConfig(
            name="h1",
            state_dir=root / "state",
            token="t",
            datastores=(
                DatastoreConfig("slow", root / "slow", shared=False),
                DatastoreConfig("fast", root / "fast", shared=False),
            ),
        )
        self.qemu = qemu
        self.storage_guard: Callable[[str], str | None] = lambda _name: None
        self._specs: dict[str, VmSpec] = {}
        self._lock = asyncio.Lock()
        vms = self.config.state_dir / "vms"
        for spec_file in sorted(vms.glob("*/spec.json")):
            spec = VmSpec.model_validate_json(spec_file.read_text())
            self._specs[spec.name] = spec

    def _dir(self, name: str) -> Path:
        return self.config.state_dir / "vms" / name

    def _write(self, path: Path, data: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)

    def spec(self, name: str) -> VmSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise VmNotFound(name)
        return spec

    def monitor(self, name: str) -> ScriptedQemu:
        if self.qemu is None:
            raise Conflict(f"VM {name} is not running", vm=name)
        return self.qemu

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[VmSpec]:
        async with self._lock:
            yield self.spec(name)

    def replace_spec(self, spec: VmSpec) -> None:
        self._write(self._dir(spec.name) / "spec.json", spec.model_dump_json(indent=2))
        self._specs[spec.name] = spec


@dataclass
class World:
    root: Path
    qemu: ScriptedQemu
    host: Host
    moves: StorageMoves
    sources: list[Path]
    bystander: Path  # a file on the source datastore that is no disk of this VM's

    @property
    def record_file(self) -> Path:
        return self.root / "state" / "vms" / VM / RECORD

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.record_file.read_text())
        return data

    def saved_spec(self) -> VmSpec:
        return VmSpec.model_validate_json((self.root / "state/vms" / VM / "spec.json").read_text())

    def targets(self) -> list[Path]:
        return [self.root / "fast" / d["target"]["path"] for d in self.record()["disks"]]

    def restart_agent(self, *, qemu_alive: bool = True) -> None:
        self.host = Host(self.root, self.qemu if qemu_alive else None)
        self.moves = StorageMoves(self.host)  # type: ignore[arg-type]


def qemu_img(*args: str) -> dict[str, Any]:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout) if "--output=json" in args else {}


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def world(tmp_path: Path) -> World:
    (tmp_path / "fast").mkdir()
    sources = [tmp_path / "slow" / VM / "disk0.qcow2", tmp_path / "slow" / VM / "data.qcow2"]
    sources[0].parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", str(sources[0]), "64M")
    qemu_img("create", "-q", "-f", "qcow2", str(sources[1]), "32M")
    bystander = tmp_path / "slow" / VM / "notes.txt"
    bystander.write_text("not a disk of this VM\n")
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
    qemu = ScriptedQemu([(p, "qcow2") for p in sources])
    host = Host(tmp_path, qemu)
    return World(tmp_path, qemu, host, StorageMoves(host), sources, bystander)  # type: ignore[arg-type]


async def clocked(qemu: ScriptedQemu, call: Awaitable[T]) -> T:
    """Run an agent call while QEMU's jobs keep going (as they do while the agent waits)."""

    async def clock() -> None:
        while True:
            await asyncio.sleep(0.005)
            qemu.tick()

    task = asyncio.create_task(clock())
    try:
        return await call
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def started_and_ready(w: World) -> None:
    st = await w.moves.start(VM, MirrorRequest(datastore="fast"))
    assert st.phase == "mirroring" and [d.status for d in st.disks] == ["running", "running"]
    w.qemu.ticks(2)
    st = await w.moves.status(VM)
    assert st.phase == "ready" and all(d.ready for d in st.disks), st


# ---------------------------------------------------------------------- the tests


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
