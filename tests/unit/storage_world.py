"""The agent's storage moves set up over real files: the VmManager stand-in, the world fixture.

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
from qmotion.agent.disks.storage import StorageMoves
from qmotion.agent.disks.storage_record import RECORD
from qmotion.agent.errors import Conflict, VmNotFound
from qmotion.agent.vms.access import QemuAccess
from qmotion.api.storage import MirrorRequest
from qmotion.api.vm import Disk, VmSpec
from tests.unit.storage_qemu import ScriptedQemu

T = TypeVar("T")

VM = "vm1"


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
        self.access = QemuAccess(self.config)  # the real one: QEMU as the agent's user here
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
