"""VM lifecycle on one host: define, start, stop, delete, status; persisted, re-attachable.

Everything about a VM lives under ``STATE/vms/NAME``: ``spec.json`` (what it is) and, while
QEMU runs, ``runtime.json`` (its PID, monitor socket, taps). QEMU is daemonized, so VMs outlive
an agent restart; on start-up the agent re-attaches to every QEMU whose PID still belongs to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from qmotion.agent.config import AgentConfig
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected, VmNotFound
from qmotion.agent.facts import VmProcess
from qmotion.agent.network.net import bridges, create_tap, delete_tap, tap_mac
from qmotion.agent.vms import images, seed
from qmotion.api.host import AccelInfo
from qmotion.api.vm import Disk, KernelBoot, MemoryBacking, VmInfo, VmSpec, VmState
from qmotion.hypervisor import hugepages, process
from qmotion.hypervisor.errors import HypervisorError, QemuStartError, QmpError, QmpUnavailable
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import LaunchPaths, build_argv, qemu_info, resolve_machine, tap_name
from qmotion.image import GuestImage, cached_image, ensure_image

log = logging.getLogger(__name__)
SAVE_TIMEOUT_S = 600.0  # saving or restoring a VM's RAM to a file
# The disks a shared-nothing incoming migration created empty (qmotion.agent.disks.nbd): deleting
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
        self.vms_dir = config.state_dir / "vms"
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

    def _socket_path(self, spec: VmSpec) -> Path:
        # Unix socket paths are limited to 108 bytes; state dirs can be long.
        digest = hashlib.sha256(f"{self.config.state_dir}:{spec.uuid}".encode()).hexdigest()[:20]
        return self.config.run_dir / f"{digest}.sock"

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
        self._save_runtime(name, None)

    # ------------------------------------------------------------------ queries

    async def info(self, name: str) -> VmInfo:
        spec = self.spec(name)
        rt = await self._alive(name)
        state = VmState.STOPPED
        qemu_status = None
        if rt is not None:
            mon = self._monitors.get(name)
            try:
                if mon is None:
                    mon = await self._attach(name, rt)
                qemu_status = await mon.status()
                state = vm_state(qemu_status)
            except HypervisorError:
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

    def _disk_path(self, spec: VmSpec, index: int) -> Path:
        disk = spec.disks[index]
        ds = self.config.datastore(disk.datastore)
        if ds is None:
            known = ", ".join(d.name for d in self.config.datastores) or "none"
            raise SpecRejected(
                f"datastore {disk.datastore!r} is not available on host {self.config.name} "
                f"(available: {known})",
                vm=spec.name,
                field=f"disks[{index}].datastore",
            )
        return ds.path / disk.path

    def check_spec(self, spec: VmSpec, *, creating: bool = False) -> None:
        """Refuse, naming the field, anything this host cannot run. Changes nothing."""
        info = qemu_info()
        machine = resolve_machine(spec.machine, info)
        if machine not in info.machine_types:
            raise SpecRejected(
                f"machine type {spec.machine!r} is not available from QEMU {info.version}",
                vm=spec.name,
                field="machine",
            )
        if spec.cpu_model not in info.cpu_models:
            raise SpecRejected(
                f"CPU model {spec.cpu_model!r} is not supported by QEMU {info.version}",
                vm=spec.name,
                field="cpu_model",
            )
        present = set(bridges())
        for i, nic in enumerate(spec.nics):
            if nic.bridge not in present:
                raise SpecRejected(
                    f"bridge {nic.bridge!r} does not exist on host {self.config.name}",
                    vm=spec.name,
                    field=f"nics[{i}].bridge",
                )
        for i, disk in enumerate(spec.disks):
            path = self._disk_path(spec, i)
            if path.is_file():
                continue
            if creating and (disk.create_size or disk.create_from):
                continue
            raise SpecRejected(
                f"disk image {disk.path!r} not found on datastore {disk.datastore!r} ({path})",
                vm=spec.name,
                field=f"disks[{i}].path",
            )
        saved = self._saved_path(spec)
        if saved is not None and not saved.is_file():
            raise SpecRejected(
                f"the saved state of {spec.name} ({saved}) does not exist on host "
                f"{self.config.name}",
                vm=spec.name,
                field="saved_state.path",
            )
        if isinstance(spec.boot, KernelBoot):
            for field in ("kernel", "initrd"):
                value = getattr(spec.boot, field)
                if value and not Path(value).is_file():
                    raise SpecRejected(
                        f"{field} image {value!r} does not exist on host {self.config.name}",
                        vm=spec.name,
                        field=f"boot.{field}",
                    )

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
        for i, disk in enumerate(spec.disks):
            path = self._disk_path(spec, i)
            if not path.exists() and disk.create_from:
                await asyncio.to_thread(
                    images.clone,
                    self.config,
                    disk.create_from,
                    path,
                    disk.format,
                    disk.create_size,
                )
                continue
            if not path.exists() and disk.create_size:
                path.parent.mkdir(parents=True, exist_ok=True)
                proc = await asyncio.to_thread(
                    subprocess.run,
                    [
                        "qemu-img",
                        "create",
                        "-q",
                        "-f",
                        disk.format,
                        str(path),
                        str(disk.create_size),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    raise OperationFailed(
                        f"creating disk {path} failed: {proc.stderr.strip()}",
                        vm=spec.name,
                        field=f"disks[{i}].path",
                    )
        vm_dir = self._dir(spec.name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        self._write(vm_dir / "spec.json", spec.model_dump_json(indent=2))
        self._specs[spec.name] = spec
        return await self.info(spec.name)

    async def _kernel_paths(self, spec: VmSpec) -> tuple[Path | None, Path | None, str]:
        boot = spec.boot
        if not isinstance(boot, KernelBoot):
            return None, None, ""
        if boot.kernel:
            return Path(boot.kernel), Path(boot.initrd) if boot.initrd else None, boot.cmdline
        image: GuestImage | None = cached_image()
        if image is None:
            image = await asyncio.to_thread(ensure_image)
        params: dict[str, str | int | float] = {"hostname": spec.name}
        if spec.guest is not None:
            g = spec.guest
            if g.ip is not None:
                params["ip"] = str(g.ip)
            params.update(
                fill=g.fill_mib, dirty=g.dirty_mib_s, check=g.check_s, disk_rate=g.disk_rate
            )
            if g.hot_mib:
                # Only when set: VMs without a hot set keep their command line unchanged.
                params["hot"] = g.hot_mib
            if g.disk_bulk_mib_s:
                params["disk_bulk"] = g.disk_bulk_mib_s
            if g.cpu_pct:
                params["cpu"] = g.cpu_pct
        cmdline = image.cmdline(**params)
        if boot.cmdline:
            cmdline += " " + boot.cmdline
        return image.kernel, image.initrd, cmdline

    async def start(self, name: str, *, incoming: str | None = None) -> VmInfo:
        """Start QEMU for a defined VM; with ``incoming``, wait for a migration stream."""
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
            saved = self._saved_path(spec) if incoming is None else None
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
            kernel, initrd, cmdline = await self._kernel_paths(spec)
            vm_dir = self._dir(name)
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
            paths = LaunchPaths(
                qmp_socket=self._socket_path(spec),
                console_log=vm_dir / "console.log",
                pidfile=vm_dir / "qemu.pid",
                disks=[self._disk_path(spec, i) for i in range(len(spec.disks))],
                kernel=kernel,
                initrd=initrd,
                cmdline=cmdline,
                seed=vm_dir / "seed.iso" if spec.cloud_init is not None else None,
            )
            if paths.seed is not None:
                await asyncio.to_thread(seed.write_seed, spec, paths.seed)
            pool = (
                await asyncio.to_thread(hugepages.backing_path, spec.memory)
                if self.config.hugepages
                else None
            )
            taps: list[str] = []
            pid: int | None = None
            try:
                for i, nic in enumerate(spec.nics):
                    tap = tap_name(spec, i)
                    await asyncio.to_thread(create_tap, tap, nic.bridge, tap_mac(nic.mac))
                    taps.append(tap)
                pid, backing = await self._launch(
                    spec, paths, accel.name, machine, incoming, pool, vm_dir / "qemu.log"
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
        return await self.info(name)

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

    def _saved_path(self, spec: VmSpec) -> Path | None:
        if spec.saved_state is None:
            return None
        ds = self.config.datastore(spec.saved_state.datastore)
        if ds is None:
            raise SpecRejected(
                f"datastore {spec.saved_state.datastore} of the saved state of {spec.name} is "
                f"not on host {self.config.name}",
                vm=spec.name,
                field="saved_state.datastore",
            )
        return ds.path / spec.saved_state.path

    async def _wait_migration(self, name: str, mon: Monitor, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status = str((await mon.execute("query-migrate")).get("status", "none"))
            if status in ("completed", "failed", "cancelled"):
                return status
            if time.monotonic() > deadline:
                raise OperationFailed(f"saving or restoring the state of {name} timed out", vm=name)
            await asyncio.sleep(0.05)

    async def _restore(self, name: str, mon: Monitor, saved: Path) -> None:
        """An incoming QEMU reads the saved state, then runs. The definition forgets the
        state before the guest runs: a crash after that must never load it again over
        disks the guest has written since."""
        await mon.execute("migrate-incoming", {"uri": f"file:{saved}"})
        status = await self._wait_migration(name, mon, SAVE_TIMEOUT_S)
        if status != "completed":
            raise OperationFailed(f"restoring {name} from {saved}: {status}", vm=name)
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
            mon = self.monitor(name)
            try:
                status = str((await mon.execute("query-migrate")).get("status", "none"))
                if status in ("active", "setup", "pre-switchover", "device") or status.startswith(
                    "postcopy"
                ):
                    raise Conflict(f"VM {name} is migrating", vm=name)
                await mon.execute("stop")
                # A live migration before may have left capabilities a file cannot take.
                caps = await mon.execute("query-migrate-capabilities")
                on = [c["capability"] for c in caps if c.get("state")]
                if on:
                    await mon.execute(
                        "migrate-set-capabilities",
                        {"capabilities": [{"capability": c, "state": False} for c in on]},
                    )
                # A file takes no TLS (a VM that arrived by a TLS migration keeps its creds).
                await mon.execute(
                    "migrate-set-parameters", {"max-bandwidth": 1 << 40, "tls-creds": ""}
                )
                await mon.execute("migrate", {"uri": f"file:{path}"})
                status = await self._wait_migration(name, mon, SAVE_TIMEOUT_S)
                if status != "completed":
                    raise OperationFailed(f"saving the state of {name}: {status}", vm=name)
            except (HypervisorError, OperationFailed) as exc:
                with contextlib.suppress(HypervisorError):
                    # A save still under way (timed out) must not complete behind our back.
                    await mon.execute("migrate_cancel")
                    for _ in range(100):
                        got = await mon.execute("query-migrate")
                        if got.get("status") not in ("active", "setup", "cancelling"):
                            break
                        await asyncio.sleep(0.05)
                path.unlink(missing_ok=True)
                with contextlib.suppress(HypervisorError):
                    await mon.execute("cont")
                raise OperationFailed(
                    f"suspending {name} failed ({exc}); it runs on, nothing saved", vm=name
                ) from exc
            # Recorded before QEMU goes: from now on the saved state is the VM.
            self.replace_spec(spec.model_copy(update={"saved_state": target}))
            await asyncio.to_thread(process.kill, rt.pid, spec.uuid)
            await self._cleanup_runtime(name, rt)
            log.info("VM %s suspended to %s", name, path)
        return await self.info(name)

    async def _launch(
        self,
        spec: VmSpec,
        paths: LaunchPaths,
        accel: str,
        machine: str,
        incoming: str | None,
        pool: Path | None,
        log_path: Path,
    ) -> tuple[int, MemoryBacking]:
        """Launch QEMU, from the huge-page pool when it had room, else from ordinary memory.

        Another guest (on this host or, in the lab, another host sharing the kernel) may take
        the pool's last pages between the check and QEMU's mapping; QEMU then fails before the
        guest runs, and the start is simply repeated without the pool.
        """
        if pool is not None:
            argv = build_argv(
                spec, paths, accel=accel, machine=machine, incoming=incoming, hugepages=pool
            )
            try:
                pid = await asyncio.to_thread(
                    process.launch, argv, paths.pidfile, log_path, spec.name
                )
                return pid, "hugepages"
            except QemuStartError as exc:
                if "backing store" not in exc.stderr:
                    raise
                log.warning("VM %s: huge-page pool short, using ordinary memory", spec.name)
        argv = build_argv(spec, paths, accel=accel, machine=machine, incoming=incoming)
        pid = await asyncio.to_thread(process.launch, argv, paths.pidfile, log_path, spec.name)
        return pid, "anonymous"

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
                    saved = self._saved_path(spec)
                    if saved is not None:
                        saved.unlink(missing_ok=True)
                for i in range(len(spec.disks)):
                    with contextlib.suppress(SpecRejected, OSError):
                        path = self._disk_path(spec, i)
                        path.unlink(missing_ok=True)
                        root = self.config.datastore(spec.disks[i].datastore)
                        if root is not None and path.parent != root.path:
                            with contextlib.suppress(OSError):
                                path.parent.rmdir()
            await asyncio.to_thread(self._end_exports, name)
            shutil.rmtree(self._dir(name), ignore_errors=True)
            del self._specs[name]
        self._locks.pop(name, None)
