"""The agent's live migrations over scripted QEMUs: the real VmManager and Migrations, with
each QEMU a QMP stand-in that keeps QEMU 10.0's run states, migration status and events.

The stand-in refuses or records what QEMU does where the agent's safety depends on it:

- ``cont`` in ``finish-migrate`` is refused ("Migration is not finalized yet"); ``cont`` in
  ``inmigrate`` is accepted, as QEMU does (it activates the disks and sets autostart), and
  recorded as a hazard: the disks would be taken while the source may still write them;
- ``migrate`` of a guest that is neither running nor paused, or during a migration, is refused;
- a destination started with ``-S`` loads the stream and stays ``paused``; without it QEMU
  runs the guest by itself when the stream completes;
- an outgoing ``completed`` is reported while QEMU is still ``finish-migrate``; postmigrate
  follows (QEMU sets the run state after the status);
- while the main loop holds the big lock (``bql_held``) only out-of-band commands answer; a
  ``yank`` of the migration's channels fails the stream and QEMU resumes the guest.

Each VM's QEMU process is a ``sleep`` whose argv carries the VM's uuid (what the agent checks
before it signals a PID), so the VmManager starts, finds again after a restart, and kills it
as it does a QEMU. The test moves the streams (``stop_for_switchover``, ``complete_outgoing``,
``load``, ``complete_incoming``...)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from qmotion.agent.config import AgentConfig
from qmotion.agent.migration.migrate import Migrations
from qmotion.agent.migration.peer import PeerTransport
from qmotion.agent.vms import definition as vm_definition
from qmotion.agent.vms import manager as vm_manager
from qmotion.agent.vms.manager import Runtime, VmManager
from qmotion.api.host import AccelInfo
from qmotion.api.vm import VmSpec
from qmotion.hypervisor import process
from qmotion.hypervisor.errors import QmpError, QmpUnavailable
from qmotion.hypervisor.monitor import Monitor
from qmotion.hypervisor.qemu import QemuInfo
from qmotion.hypervisor.user import QemuUser

OOB = {"migrate-pause", "migrate-recover", "yank"}  # 'allow-oob': true in qapi/migration.json
STREAMING = ("setup", "active", "pre-switchover", "device")
M1, M2 = "a" * 32, "b" * 32  # two migrations' ids


class Listener:
    """qemu.qmp's EventListener, as the agent uses it: iterated, or ``get``."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self.queue.get()

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class MigratingQemu:
    def __init__(self, run_state: str = "running", autostart: bool = True) -> None:
        self.run_state = run_state
        self.migration = "none"
        self.autostart = autostart
        self.alive = True
        self.bql_held = False
        self.commands: list[str] = []
        self.hazards: list[str] = []
        self.capabilities: dict[str, bool] = {}
        self.params: dict[str, Any] = {"downtime-limit": 300}
        self.uri: str | None = None
        self.listening: str | None = None
        self.before: str = run_state  # the run state the switchover stopped
        self.on_migrate: list[Any] = []  # callables run as ``migrate`` is issued
        self.refuse_migrate: str | None = None  # QEMU's error for the next migrate
        self.on_quit: list[Any] = []
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ the monitor's API

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[Listener]:
        listener = Listener(set(names))
        self._listeners.append(listener)
        try:
            yield listener
        finally:
            self._listeners.remove(listener)

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        if oob and command not in OOB:
            raise QmpError(command, "GenericError", f"{command} does not allow out-of-band")
        # The main loop holds the big lock: the command waits. A flag the test sets from
        # outside any event loop (an agent restart is a new one), so polled.
        while self.bql_held and not oob and self.alive:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if not self.alive:
            raise QmpUnavailable(f"QMP {command}: monitor gone")
        self.commands.append(command)
        handler = getattr(self, "_qmp_" + command.replace("-", "_"), None)
        if handler is None:
            raise AssertionError(f"unexpected QMP {command}")
        return handler(args or {})

    async def close(self) -> None:
        pass

    # ------------------------------------------------------------------ events

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        msg: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            msg["data"] = data
        for listener in self._listeners:
            if event in listener.names:
                listener.queue.put_nowait(msg)

    def set_migration(self, status: str) -> None:
        self.migration = status
        self.emit("MIGRATION", {"status": status})

    def set_run_state(self, state: str) -> None:
        was, self.run_state = self.run_state, state
        if state == "running" and was != "running":
            self.emit("RESUME")
        if was == "running" and state != "running":
            self.emit("STOP")

    # ------------------------------------------------------------------ the source's stream

    def stop_for_switchover(self) -> None:
        """The last pass: the guest stops; with pause-before-switchover QEMU waits for the
        agent's migrate-continue."""
        self.before = self.run_state
        self.set_run_state("finish-migrate")
        if self.capabilities.get("pause-before-switchover"):
            self.set_migration("pre-switchover")

    def complete_outgoing(self, *, postmigrate: bool = True) -> None:
        self.set_migration("completed")
        if postmigrate:
            self.set_run_state("postmigrate")

    def fail_outgoing(self) -> None:
        """The stream failed: QEMU resumes a guest it stopped."""
        self.bql_held = False
        self.set_migration("failed")
        if self.run_state == "finish-migrate":
            self.set_run_state(self.before)

    # ------------------------------------------------------------------ the destination's

    def load(self, status: str = "active") -> None:
        self.set_migration(status)

    def complete_incoming(self) -> None:
        """process_incoming_migration_bh: the run state first, then the status."""
        self.set_run_state("running" if self.autostart else "paused")
        self.set_migration("completed")

    def postcopy_run(self) -> None:
        """The device state loaded in postcopy (loadvm_postcopy_handle_run_bh)."""
        self.set_run_state("running" if self.autostart else "paused")

    # ------------------------------------------------------------------ QMP

    def _qmp_query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.run_state, "running": self.run_state == "running"}

    def _qmp_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.migration}
        if self.listening is not None:
            host, port = self.listening.rsplit(":", 2)[1:]
            out["socket-address"] = [{"type": "inet", "host": host, "port": port}]
        return out

    def _qmp_query_migrate_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        return dict(self.params)

    def _qmp_migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args["capabilities"]:
            self.capabilities[cap["capability"]] = bool(cap["state"])
        return {}

    def _qmp_migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        self.params.update(args)
        return {}

    def _qmp_object_add(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _qmp_object_del(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _qmp_announce_self(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _qmp_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration in STREAMING:
            raise QmpError("migrate", "GenericError", "There's a migration process in progress")
        if self.run_state not in ("running", "paused"):
            raise QmpError("migrate", "GenericError", f"cannot migrate while {self.run_state}")
        if self.refuse_migrate is not None:
            raise QmpError("migrate", "GenericError", self.refuse_migrate)
        for hook in self.on_migrate:
            hook()
        self.uri = str(args["uri"])
        self.set_migration("setup")
        return {}

    def _qmp_migrate_continue(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration != "pre-switchover":
            raise QmpError("migrate-continue", "GenericError", "not in pre-switchover")
        self.set_migration("device")
        return {}

    def _qmp_migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration in STREAMING:
            self.set_migration("cancelling")
            self.set_migration("cancelled")
            if self.run_state == "finish-migrate":
                self.set_run_state(self.before)
        return {}

    def _qmp_yank(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration in STREAMING:
            self.fail_outgoing()  # the channel's write fails: QEMU fails the stream
        return {}

    def _qmp_migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.run_state == "inmigrate", "migrate-incoming needs -incoming defer"
        self.listening = str(args["uri"]).replace(":0", ":40123")
        self.set_migration("setup")
        return {}

    def _qmp_cont(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.run_state == "finish-migrate":
            raise QmpError("cont", "GenericError", "Migration is not finalized yet")
        if self.run_state == "inmigrate":
            # qmp_cont: the disks activated and autostart set, while the stream still loads.
            self.hazards.append("cont while inmigrate: disks activated mid-stream")
            self.autostart = True
            return {}
        if self.run_state in ("paused", "postmigrate", "prelaunch"):
            self.set_run_state("running")
        return {}

    def _qmp_quit(self, args: dict[str, Any]) -> dict[str, Any]:
        self.alive = False
        for hook in self.on_quit:
            hook()
        return {}


# ---------------------------------------------------------------------- hosts


def _qemu_info(binary: str = "") -> QemuInfo:
    return QemuInfo("10.0.2", ["pc-i440fx-10.0"], {"pc": "pc-i440fx-10.0"}, ["qemu64"])


async def _tcg() -> AccelInfo:
    return AccelInfo(name="tcg", reason="scripted")


class Host(VmManager):
    """The real VmManager of one host, over a real state directory; its QEMUs are scripted
    and outlive the host object (a new Host over the same directory is a restarted agent)."""

    def __init__(self, cluster: Cluster, name: str, address: str, cgroups: bool = False) -> None:
        self.cluster = cluster
        root = cluster.root / name
        config = AgentConfig(
            name=name,
            state_dir=root / "state",
            token="t" * 32,
            run_dir=root / "run",
            address=address,
            accel="tcg",
            hugepages=False,
            cgroups=cgroups,
        )
        super().__init__(config, _tcg)
        cluster.qemus.setdefault(name, {})

    @property
    def qemus(self) -> dict[str, MigratingQemu]:
        return self.cluster.qemus[self.config.name]

    async def _attach(self, name: str, rt: Runtime) -> Monitor:
        mon = self.qemus[name]
        self._monitors[name] = mon  # type: ignore[assignment]
        return mon  # type: ignore[return-value]


class Cluster:
    """Hosts over ``root``; ``launch`` stands in for ``process.launch``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kernel = root / "vmlinuz"
        self.kernel.write_bytes(b"")
        self.qemus: dict[str, dict[str, MigratingQemu]] = {}
        self.argv: dict[tuple[str, str], list[str]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def spec(self, name: str = "vm1") -> VmSpec:
        return VmSpec(name=name, memory=256, boot={"kind": "kernel", "kernel": str(self.kernel)})

    def launch(
        self,
        argv: list[str],
        pidfile: Path,
        log: Path,
        vm: str,
        qmp_socket: Path,
        user: QemuUser | None = None,
        pass_fds: tuple[int, ...] = (),
        placed: Callable[[int], None] | None = None,
    ) -> int:
        assert user is None and not pass_fds  # these VMs have no NIC; the agent runs QEMU as root
        host = next(h for h in self.qemus if pidfile.is_relative_to(self.root / h))
        uuid = argv[argv.index("-uuid") + 1]
        proc = subprocess.Popen([uuid, "3600"], executable=shutil.which("sleep"))
        self.procs.append(proc)
        if placed is not None:  # as process.launch: its cgroup, or it is killed
            try:
                placed(proc.pid)
            except BaseException:
                proc.kill()
                raise
        # Popen returns while the kernel may still be setting the new argv up; QEMU's
        # launch returns once its monitor answers.
        deadline = time.monotonic() + 5
        while not process.is_qemu_of(proc.pid, UUID(uuid)) and time.monotonic() < deadline:
            time.sleep(0.001)
        self.argv[host, vm] = argv
        incoming = "-incoming" in argv
        qemu = MigratingQemu("inmigrate" if incoming else "running", autostart="-S" not in argv)
        qemu.on_quit.append(proc.kill)
        self.qemus[host][vm] = qemu
        return proc.pid

    async def host(
        self,
        name: str,
        address: str = "198.19.1.12",
        peers: PeerTransport | None = None,
        cgroups: bool = False,
    ) -> tuple[Host, Migrations]:
        """The agent of host ``name``, (re)started: its VMs found again, settled."""
        host = Host(self, name, address, cgroups)
        await host.load()
        migrations = Migrations(host, peer_transport=peers)
        await migrations.settle_after_restart()
        return host, migrations

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def cluster_at(root: Path, monkeypatch: Any) -> Iterator[Cluster]:
    cluster = Cluster(root)
    for module in (vm_manager, vm_definition):
        monkeypatch.setattr(module, "qemu_info", _qemu_info)
    monkeypatch.setattr(process, "launch", cluster.launch)
    # The kernel lives under root: root stands for the host's image cache (a kernel from
    # anywhere else is refused).
    monkeypatch.setenv("QMOTION_CACHE_DIR", str(root))
    try:
        yield cluster
    finally:
        cluster.close()


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.01)
