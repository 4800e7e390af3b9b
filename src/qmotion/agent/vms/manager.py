"""VM lifecycle on one host: define, start, stop, delete, status; persisted, re-attachable.

Everything about a VM lives under ``STATE/vms/NAME``: ``spec.json`` (what it is) and, while
QEMU runs, ``runtime.json`` (its PID, monitor socket, taps). QEMU runs in a session (and a
cgroup) of its own, so VMs outlive an agent restart; on start-up the agent re-attaches to every
QEMU whose PID still belongs to it. What a definition needs of the host is in ``definition``,
what QEMU's unprivileged user is handed in ``access``, launching QEMU in ``launch``, and saving
a VM's state to a file in ``saved``; this class holds the record and the locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qmotion.agent.config import AgentConfig
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected, VmNotFound
from qmotion.agent.facts import VmProcess
from qmotion.agent.network.net import create_tap, delete_tap, tap_mac
from qmotion.agent.vms import definition
from qmotion.agent.vms.access import QemuAccess
from qmotion.agent.vms.definition import create_disks, disk_path, saved_path
from qmotion.agent.vms.launch import launch_paths, launch_qemu
from qmotion.agent.vms.migration_record import MigrationRecords, outgoing_status
from qmotion.agent.vms.saved import load_state, save_state
from qmotion.api.host import AccelInfo
from qmotion.api.vm import Disk, MemoryBacking, VmInfo, VmSpec, VmState
from qmotion.hypervisor import hugepages, process
from qmotion.hypervisor.cgroups import Cgroups, agent_group, limits_for
from qmotion.hypervisor.errors import HypervisorError, QmpError, QmpUnavailable
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import qemu_info, resolve_machine, tap_name

MONITOR_ANSWER_S = 3.0  # a VM's monitor that does not say its run state by then is wedged
log = logging.getLogger(__name__)
# The disks a shared-nothing incoming migration created empty (agent.disks.nbd_incoming): deleting
# the VM before it ran here removes them too; once it ran here they are simply its disks.
INCOMING_DISKS = "incoming-disks.json"

_PAUSED = {
    "paused",
    "postmigrate",
    "inmigrate",
    "prelaunch",
    "finish-migrate",
    "suspended",
    "save-vm",
    "restore-vm",
    "debug",
    "io-error",
    "watchdog",
    "colo",
}


class Runtime(BaseModel):
    pid: int
    qmp_socket: str
    started_at: datetime
    accel: str
    machine: str
    taps: list[str]
    memory_backing: MemoryBacking = "anonymous"


def vm_state(qemu_status: str) -> VmState:
    if qemu_status == "running":
        return VmState.RUNNING
    if qemu_status in _PAUSED:
        return VmState.PAUSED
    if qemu_status == "shutdown":
        return VmState.STOPPING
    return VmState.CRASHED


class VmManager:
    def __init__(self, config: AgentConfig, accel: Callable[[], Awaitable[AccelInfo]]) -> None:
        self.config = config
        self._accel = accel
        # What QEMU, as its own unprivileged user, is handed of the host.
        self.access = QemuAccess(config)
        # Each QEMU in a cgroup of its own (None: no writable hierarchy here, or not asked).
        self.cgroups = (
            Cgroups.detect(agent_group(config.name, config.state_dir)) if config.cgroups else None
        )
        self.vms_dir = config.state_dir / "vms"
        self.records = MigrationRecords(self.vms_dir)  # each VM's migration ids
        # Set by the storage moves: why a VM must not be started, deleted or migrated now.
        self.storage_guard: Callable[[str], str | None] = lambda _name: None
        self._specs: dict[str, VmSpec] = {}
        self._runtime: dict[str, Runtime] = {}
        self._monitors: dict[str, Monitor] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ persistence

    def _dir(self, name: str) -> Path:
        return self.vms_dir / name

    def _write(self, path: Path, data: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)

    def _save_runtime(self, name: str, rt: Runtime | None) -> None:
        path = self._dir(name) / "runtime.json"
        if rt is None:
            path.unlink(missing_ok=True)
            self._runtime.pop(name, None)
        else:
            self._write(path, rt.model_dump_json(indent=2))
            self._runtime[name] = rt

    async def load(self) -> None:
        """Read every defined VM and re-attach to the QEMUs that are still running."""
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        for vm_dir in sorted(self.vms_dir.iterdir()):
            spec_file = vm_dir / "spec.json"
            if not spec_file.is_file():
                continue
            try:
                spec = VmSpec.model_validate_json(spec_file.read_text())
            except ValidationError as exc:
                log.error("ignoring unreadable VM definition %s: %s", spec_file, exc)
                continue
            self._specs[spec.name] = spec
            # Exports of a cold migration the agent was serving when it stopped: the manager
            # asks again (they are idempotent) or rolls back.
            await asyncio.to_thread(self._end_exports, spec.name)
            rt_file = vm_dir / "runtime.json"
            if not rt_file.is_file():
                continue
            rt = Runtime.model_validate_json(rt_file.read_text())
            if process.is_qemu_of(rt.pid, spec.uuid):
                self._runtime[spec.name] = rt
                await asyncio.to_thread(self._regroup, spec, rt)
                try:
                    await self._attach(spec.name, rt)
                    log.info("re-attached to VM %s (pid %d)", spec.name, rt.pid)
                except HypervisorError as exc:
                    log.error(
                        "VM %s runs (pid %d) but its monitor is unreachable: %s",
                        spec.name,
                        rt.pid,
                        exc,
                    )
            else:
                log.info("VM %s stopped while the agent was away", spec.name)
                await self._cleanup_runtime(spec.name, rt)

    def names(self) -> list[str]:
        return list(self._specs)

    def incoming_disks(self, name: str) -> list[Disk]:
        """The disks an incoming shared-nothing migration created for this VM, while it has
        not run here yet."""
        path = self._dir(name) / INCOMING_DISKS
        try:
            return [Disk.model_validate(d) for d in json.loads(path.read_text())]
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("unreadable %s: %s", path, exc)
            return []

    async def _attach(self, name: str, rt: Runtime) -> Monitor:
        mon = Monitor(Path(rt.qmp_socket), name)
        await mon.connect()
        self._monitors[name] = mon
        return mon

    async def close(self) -> None:
        """Let go of monitors; the VMs keep running."""
        for mon in self._monitors.values():
            await mon.close()
        self._monitors.clear()

    # ------------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[VmSpec]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            spec = self._specs.get(name)
            if spec is None:
                raise VmNotFound(name)
            yield spec

    def spec(self, name: str) -> VmSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise VmNotFound(name)
        return spec

    def replace_spec(self, spec: VmSpec) -> None:
        """A running VM's definition changed underneath QEMU (its disks moved): persisted first,
        so a restart of the agent or of the VM uses what QEMU uses now."""
        self._write(self._dir(spec.name) / "spec.json", spec.model_dump_json(indent=2))
        self._specs[spec.name] = spec

    def runtime(self, name: str) -> Runtime | None:
        return self._runtime.get(name)

    def monitor(self, name: str) -> Monitor:
        mon = self._monitors.get(name)
        if mon is None:
            raise Conflict(f"VM {name} is not running", vm=name)
        return mon

    def running_processes(self) -> list[VmProcess]:
        return [
            VmProcess(name, rt.pid, self._specs[name].memory)
            for name, rt in self._runtime.items()
            if name in self._specs
        ]

    async def _alive(self, name: str) -> Runtime | None:
        """The runtime of a VM whose QEMU still runs; cleans up after one that exited."""
        rt = self._runtime.get(name)
        if rt is None:
            return None
        if process.is_qemu_of(rt.pid, self._specs[name].uuid):
            return rt
        await self._cleanup_runtime(name, rt)
        return None

    async def _cleanup_runtime(self, name: str, rt: Runtime) -> None:
        mon = self._monitors.pop(name, None)
        if mon is not None:
            await mon.close()
        for tap in rt.taps:
            await asyncio.to_thread(delete_tap, tap)
        await asyncio.to_thread(Path(rt.qmp_socket).unlink, missing_ok=True)
        spec = self._specs.get(name)
        if self.cgroups is not None and spec is not None:
            await asyncio.to_thread(self.cgroups.remove, spec.uuid.hex)
        self._save_runtime(name, None)

    # ------------------------------------------------------------------ queries

    async def info(self, name: str) -> VmInfo:
        spec = self.spec(name)
        rt = await self._alive(name)
        state = VmState.STOPPED
        qemu_status = None
        record = self.records.get(name)
        outgoing = None
        if rt is not None:
            mon = self._monitors.get(name)
            try:
                if mon is None:
                    mon = await self._attach(name, rt)
                # A QEMU can hold its monitor for long (a destination in a TLS handshake on a
                # dead link, a source finishing a switchover under its big lock): one VM must
                # not hold up the host's answer about all of them.
                qemu_status = await asyncio.wait_for(mon.status(), MONITOR_ANSWER_S)
                state = vm_state(qemu_status)
                if record.outgoing is not None:
                    with contextlib.suppress(QmpError):  # the run state stands on its own
                        got = await mon.execute("query-migrate")
                        outgoing = outgoing_status(str(got.get("status", "none")), qemu_status)
            except (HypervisorError, TimeoutError):
                # The process exists but its monitor does not answer: exiting or wedged.
                state = VmState.STOPPING if await self._alive(name) else VmState.STOPPED
        if state == VmState.STOPPED and spec.saved_state is not None:
            state = VmState.SUSPENDED
        return VmInfo(
            name=name,
            uuid=spec.uuid,
            host=self.config.name,
            state=state,
            qemu_status=qemu_status,
            pid=rt.pid if rt and state != "stopped" else None,
            accel=rt.accel if rt else None,
            started_at=rt.started_at if rt else None,
            spec=spec,
            taps=rt.taps if rt else [],
            memory_backing=rt.memory_backing if rt and state != "stopped" else None,
            incoming_migration=record.incoming.id if record.incoming is not None else None,
            outgoing_migration=record.outgoing.id if record.outgoing is not None else None,
            outgoing_status=outgoing,
        )

    async def list(self) -> list[VmInfo]:
        return [await self.info(name) for name in sorted(self._specs)]

    def console(self, name: str, tail_bytes: int) -> str:
        self.spec(name)
        path = self._dir(name) / "console.log"
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            return fh.read().decode(errors="replace")

    # ------------------------------------------------------------------ checks

    def check_spec(self, spec: VmSpec, *, creating: bool = False) -> None:
        """Refuse, naming the field, anything this host cannot run. Changes nothing."""
        definition.check_spec(self.config, spec, creating=creating)

    # ------------------------------------------------------------------ lifecycle

    async def define(self, spec: VmSpec) -> VmInfo:
        if spec.name in self._specs:
            raise Conflict(
                f"a VM named {spec.name!r} is already defined", vm=spec.name, field="name"
            )
        if any(s.uuid == spec.uuid for s in self._specs.values()):
            raise Conflict(
                f"a VM with uuid {spec.uuid} is already defined", vm=spec.name, field="uuid"
            )
        await asyncio.to_thread(self.check_spec, spec, creating=True)
        await create_disks(self.config, spec)
        vm_dir = self._dir(spec.name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        self.records.clear(spec.name)  # a new VM: nothing of a namesake's migrations
        self._write(vm_dir / "spec.json", spec.model_dump_json(indent=2))
        self._specs[spec.name] = spec
        return await self.info(spec.name)

    async def start(
        self, name: str, *, incoming: str | None = None, paused: bool = False
    ) -> VmInfo:
        """Start QEMU for a defined VM; with ``incoming``, wait for a migration stream;
        ``paused`` (-S): the guest runs only on ``cont`` (a stream loaded stays paused)."""
        await self.launch(name, incoming=incoming, paused=paused)
        return await self.info(name)

    async def launch(self, name: str, *, incoming: str | None = None, paused: bool = False) -> None:
        """``start`` without the answer (a migration's destination needs none: every ms of
        its start delays the stream)."""
        async with self.locked(name) as spec:
            if await self._alive(name) is not None:
                raise Conflict(f"VM {name} is already running", vm=name)
            if incoming is None and (self._dir(name) / "moving").is_file():
                raise Conflict(
                    f"VM {name} is being moved to another host (cold migration): not started",
                    vm=name,
                )
            if (reason := self.storage_guard(name)) is not None and "switching" in reason:
                # Which copy holds its latest writes is not settled: starting either may
                # run it on the stale one.
                raise Conflict(f"VM {name} cannot start: {reason}", vm=name)
            await asyncio.to_thread(self.check_spec, spec)
            saved = saved_path(self.config, spec) if incoming is None else None
            if saved is not None:
                if not saved.is_file():
                    raise Conflict(
                        f"VM {name} is suspended but its saved state {saved} is missing",
                        vm=name,
                        field="saved_state",
                    )
                incoming = "defer"
            accel = await self._accel()
            info = qemu_info()
            machine = resolve_machine(spec.machine, info)
            vm_dir = self._dir(name)
            paths = await launch_paths(self.config, spec, vm_dir)
            formats: list[str] = [d.format for d in spec.disks]
            await asyncio.to_thread(self.access.for_launch, name, paths, formats)
            if saved is not None:
                await asyncio.to_thread(self.access.saved_state, saved)
            pool = (
                await asyncio.to_thread(hugepages.backing_path, spec.memory)
                if self.config.hugepages
                else None
            )
            if pool is not None:
                pool = await asyncio.to_thread(self.access.hugepages, pool)
            taps: list[str] = []
            pid: int | None = None
            try:
                for i, nic in enumerate(spec.nics):
                    tap = tap_name(spec, i)
                    await asyncio.to_thread(create_tap, tap, nic.bridge, tap_mac(nic.mac))
                    taps.append(tap)
                pid, backing = await launch_qemu(
                    spec,
                    paths,
                    accel.name,
                    machine,
                    incoming,
                    pool,
                    vm_dir / "qemu.log",
                    paused,
                    user=self.access.user,
                    placed=self._placer(spec, accel.name),
                )
                rt = Runtime(
                    pid=pid,
                    qmp_socket=str(paths.qmp_socket),
                    started_at=datetime.now(UTC),
                    accel=accel.name,
                    machine=machine,
                    taps=taps,
                    memory_backing=backing,
                )
                self._save_runtime(name, rt)
                mon = await self._attach(name, rt)
                if saved is not None:
                    await self._restore(name, mon, saved)
            except (HypervisorError, OSError, LookupError, OperationFailed) as exc:
                if pid is not None:
                    await asyncio.to_thread(process.kill, pid, spec.uuid)
                for tap in taps:
                    await asyncio.to_thread(delete_tap, tap)
                if self.cgroups is not None:
                    await asyncio.to_thread(self.cgroups.remove, spec.uuid.hex)
                self._save_runtime(name, None)
                raise OperationFailed(
                    f"starting VM {name} failed: {exc}; its QEMU and taps were removed",
                    vm=name,
                    qmp_class=getattr(exc, "qmp_class", None),
                ) from exc
            log.info("started VM %s (pid %d, %s, %s memory)", name, pid, accel.name, backing)
            if saved is not None:
                # Resumed: the state is used up (the definition forgot it before the run).
                saved.unlink(missing_ok=True)
                log.info("VM %s resumed from %s", name, saved)

    def _regroup(self, spec: VmSpec, rt: Runtime) -> None:
        """A QEMU found running at start-up in its cgroup, with its limits: one started by an
        agent without cgroups (an upgrade) gets them now; one in its group already keeps it.
        Its user stays what it was started as (only a restart or a migration changes that)."""
        if self.cgroups is None:
            return
        try:
            self.cgroups.place(spec.uuid.hex, rt.pid, limits_for(spec.vcpus, spec.memory, rt.accel))
        except HypervisorError as exc:
            log.error("VM %s (pid %d) runs outside its cgroup: %s", spec.name, rt.pid, exc)

    def _placer(self, spec: VmSpec, accel: str) -> Callable[[int], None] | None:
        """What puts a new QEMU in its cgroup, the moment it exists."""
        groups = self.cgroups
        if groups is None:
            return None
        limits = limits_for(spec.vcpus, spec.memory, accel)
        return lambda pid: groups.place(spec.uuid.hex, pid, limits)

    def _end_exports(self, name: str) -> None:
        """qemu-nbd exports of this VM's disks (a cold migration's) that are still running:
        ended, so none outlives the VM's record (they serve disks without authentication)."""
        path = self._dir(name) / "exports.json"
        if not path.is_file():
            return
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids = [int(p) for p in json.loads(path.read_text())["pids"]]
            left = process.end_nbd_exports(pids)
            if left:
                log.error("qemu-nbd %s of %s did not end", left, name)
            else:
                path.unlink(missing_ok=True)

    async def _restore(self, name: str, mon: Monitor, saved: Path) -> None:
        """An incoming QEMU reads the saved state, then runs. The definition forgets the
        state before the guest runs: a crash after that must never load it again over
        disks the guest has written since."""
        await load_state(name, mon, saved)
        spec = self.spec(name)
        self.replace_spec(spec.model_copy(update={"saved_state": None}))
        try:
            await mon.execute("cont")
        except HypervisorError:
            self.replace_spec(spec)  # not run: the state is still the VM
            raise

    async def suspend(self, name: str) -> VmInfo:
        """Save a running VM's memory and device state to its first disk's datastore and
        stop it (as virsh managedsave); its next start resumes from there."""
        async with self.locked(name) as spec:
            rt = await self._alive(name)
            if rt is None:
                raise Conflict(f"VM {name} is not running: nothing to suspend", vm=name)
            if (reason := self.storage_guard(name)) is not None:
                raise Conflict(f"VM {name} cannot be suspended now: {reason}", vm=name)
            if not spec.disks:
                raise Conflict(
                    f"VM {name} has no disk: its state is saved next to its first disk",
                    vm=name,
                )
            ds = self.config.datastore(spec.disks[0].datastore)
            assert ds is not None  # check_spec at start
            target = Disk(
                datastore=ds.name, path=f"{name}/saved-{spec.uuid.hex[:8]}.state", format="raw"
            )
            path = ds.path / target.path
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                await asyncio.to_thread(self.access.saved_state, path)
                await save_state(name, self.monitor(name), path)
            except BaseException:
                # Refused (a migration under way) or failed: no empty file is left behind.
                await asyncio.to_thread(path.unlink, missing_ok=True)
                raise
            # Recorded before QEMU goes: from now on the saved state is the VM.
            self.replace_spec(spec.model_copy(update={"saved_state": target}))
            await asyncio.to_thread(process.kill, rt.pid, spec.uuid)
            await self._cleanup_runtime(name, rt)
            log.info("VM %s suspended to %s", name, path)
        return await self.info(name)

    async def stop(self, name: str, *, force: bool = False, timeout_s: float = 30.0) -> VmInfo:
        async with self.locked(name) as spec:
            rt = await self._alive(name)
            if rt is None:
                raise Conflict(f"VM {name} is not running", vm=name)
            mon = self._monitors.get(name)
            gone = False
            if not force and mon is not None:
                with contextlib.suppress(QmpError, QmpUnavailable):
                    await mon.execute("system_powerdown")
                    gone = await asyncio.to_thread(process.wait_gone, rt.pid, spec.uuid, timeout_s)
                if not gone:
                    log.warning(
                        "VM %s ignored the ACPI power button for %.0f s; forcing", name, timeout_s
                    )
            if not gone and mon is not None:
                with contextlib.suppress(QmpError, QmpUnavailable):
                    await mon.execute("quit")
                gone = await asyncio.to_thread(process.wait_gone, rt.pid, spec.uuid, 5.0)
            if not gone:
                await asyncio.to_thread(process.kill, rt.pid, spec.uuid)
            await self._cleanup_runtime(name, rt)
        return await self.info(name)

    async def delete(self, name: str, *, force: bool = False, with_disks: bool = False) -> None:
        """Forget a VM. Its disk images stay (they are data, not definition) unless
        ``with_disks``: then a stopped VM's image files go too (a cold migration's end)."""
        async with self.locked(name) as spec:
            if with_disks and await self._alive(name) is not None:
                raise Conflict(f"VM {name} is running: its disks are not removed", vm=name)
            if not force and (reason := self.storage_guard(name)) is not None:
                raise Conflict(f"VM {name} cannot be deleted now: {reason}", vm=name)
            rt = await self._alive(name)
            if rt is not None:
                if not force:
                    raise Conflict(
                        f"VM {name} is running; stop it first or delete with force", vm=name
                    )
                await asyncio.to_thread(process.kill, rt.pid, spec.uuid)
                await self._cleanup_runtime(name, rt)
            for disk in self.incoming_disks(name):
                # Made empty for a copy that did not finish: nothing of the VM is on them.
                with contextlib.suppress(OSError):
                    root = self.config.datastore(disk.datastore)
                    if root is not None:
                        (root.path / disk.path).unlink(missing_ok=True)
                        if (root.path / disk.path).parent != root.path:
                            with contextlib.suppress(OSError):
                                (root.path / disk.path).parent.rmdir()
            if with_disks:
                with contextlib.suppress(SpecRejected, OSError):
                    saved = saved_path(self.config, spec)
                    if saved is not None:
                        saved.unlink(missing_ok=True)
                for i in range(len(spec.disks)):
                    with contextlib.suppress(SpecRejected, OSError):
                        path = disk_path(self.config, spec, i)
                        path.unlink(missing_ok=True)
                        root = self.config.datastore(spec.disks[i].datastore)
                        if root is not None and path.parent != root.path:
                            with contextlib.suppress(OSError):
                                path.parent.rmdir()
            await asyncio.to_thread(self._end_exports, name)
            shutil.rmtree(self._dir(name), ignore_errors=True)
            self.records.forget(name)
            del self._specs[name]
        self._locks.pop(name, None)
