"""A scripted QMP stand-in for the agent's storage moves: QEMU 10.0's block graph and job rules.

It refuses what QEMU refuses:

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
  running or ready job: 'aborting' until the next tick)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmotion.hypervisor.errors import QmpError

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
    direct: bool = False  # a file node's cache.direct (O_DIRECT)
    aio: str = "threads"
    given: frozenset[str] = frozenset()  # the options blockdev-add named


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
        self.no_direct_io = False  # the file system refuses O_DIRECT (file-posix: EINVAL)

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
            direct = bool(args.get("cache", {}).get("direct", False))
            if direct and self.no_direct_io:
                raise QmpError(
                    command, "GenericError", f"Could not open '{filename}': Invalid argument"
                )
            aio = args.get("aio", "threads")
            self.nodes[name] = Node(
                name, "file", filename, direct=direct, aio=aio, given=frozenset(args)
            )
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

    def _qmp_blockdev_reopen(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """block.c's bdrv_reopen_prepare / file-posix: the same node, driver and file; an
        option blockdev-add named cannot be left out (reset to its default); the aio mode
        cannot change."""
        for opts in args["options"]:
            self._expect(command, opts, FILE_ARGS)
            node = self._node(command, str(opts["node-name"]))
            for left_out in sorted(node.given - set(opts)):
                raise QmpError(
                    command,
                    "GenericError",
                    f"Option '{left_out}' cannot be reset to its default value",
                )
            if opts.get("driver") != node.drv or node.drv != "file":
                raise QmpError(command, "GenericError", "Cannot change the option 'driver'")
            if str(opts.get("filename")) != node.filename:
                raise QmpError(command, "GenericError", "Cannot change the option 'filename'")
            if opts.get("aio", "threads") != node.aio:
                raise QmpError(command, "GenericError", "Cannot change the option 'aio'")
            node.direct = bool(opts.get("cache", {}).get("direct", False))
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
