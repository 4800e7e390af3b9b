"""What a VM definition needs of this host: the checks that refuse what cannot run here, where
its disks and saved state are, and the disks it asks to have made.

Functions of the agent's configuration and a spec only; the VM manager calls them at define
and start (``check_spec`` changes nothing, ``create_disks`` only makes missing disk files).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from qmotion.agent.config import AgentConfig
from qmotion.agent.errors import OperationFailed, SpecRejected
from qmotion.agent.network.net import bridges
from qmotion.agent.vms import images
from qmotion.api.vm import KernelBoot, VmSpec
from qmotion.hypervisor.qemu import qemu_info, resolve_machine
from qmotion.paths import cache_dir


def disk_path(config: AgentConfig, spec: VmSpec, index: int) -> Path:
    disk = spec.disks[index]
    ds = config.datastore(disk.datastore)
    if ds is None:
        known = ", ".join(d.name for d in config.datastores) or "none"
        raise SpecRejected(
            f"datastore {disk.datastore!r} is not available on host {config.name} "
            f"(available: {known})",
            vm=spec.name,
            field=f"disks[{index}].datastore",
        )
    return ds.path / disk.path


def saved_path(config: AgentConfig, spec: VmSpec) -> Path | None:
    if spec.saved_state is None:
        return None
    ds = config.datastore(spec.saved_state.datastore)
    if ds is None:
        raise SpecRejected(
            f"datastore {spec.saved_state.datastore} of the saved state of {spec.name} is "
            f"not on host {config.name}",
            vm=spec.name,
            field="saved_state.datastore",
        )
    return ds.path / spec.saved_state.path


def check_spec(config: AgentConfig, spec: VmSpec, *, creating: bool = False) -> None:
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
                f"bridge {nic.bridge!r} does not exist on host {config.name}",
                vm=spec.name,
                field=f"nics[{i}].bridge",
            )
    for i, disk in enumerate(spec.disks):
        path = disk_path(config, spec, i)
        if path.is_file():
            continue
        if creating and (disk.create_size or disk.create_from):
            continue
        raise SpecRejected(
            f"disk image {disk.path!r} not found on datastore {disk.datastore!r} ({path})",
            vm=spec.name,
            field=f"disks[{i}].path",
        )
    saved = saved_path(config, spec)
    if saved is not None and not saved.is_file():
        raise SpecRejected(
            f"the saved state of {spec.name} ({saved}) does not exist on host {config.name}",
            vm=spec.name,
            field="saved_state.path",
        )
    check_boot_files(config, spec)


def boot_roots(config: AgentConfig) -> list[Path]:
    """Where a kernel or initrd may come from: the host's datastores and its image cache."""
    return [d.path.resolve() for d in config.datastores] + [cache_dir().resolve()]


def check_boot_files(config: AgentConfig, spec: VmSpec) -> None:
    """A kernel or initrd must be a file inside a datastore or the image cache: QEMU reads
    it as root, so any other path (``/etc/shadow``, a key) would hand it to the guest."""
    if not isinstance(spec.boot, KernelBoot):
        return
    for field in ("kernel", "initrd"):
        value = getattr(spec.boot, field)
        if not value:
            continue
        path = Path(value)
        resolved = path.resolve()  # symbolic links out of a datastore count as outside
        if not path.is_absolute() or not any(
            resolved.is_relative_to(r) for r in boot_roots(config)
        ):
            roots = ", ".join(str(r) for r in boot_roots(config))
            raise SpecRejected(
                f"{field} {value!r} is outside this host's datastores and image cache "
                f"({roots}); copy it into a datastore",
                vm=spec.name,
                field=f"boot.{field}",
            )
        if not resolved.is_file():
            raise SpecRejected(
                f"{field} image {value!r} does not exist on host {config.name}",
                vm=spec.name,
                field=f"boot.{field}",
            )


async def create_disks(config: AgentConfig, spec: VmSpec) -> None:
    """Make the disks the definition asks for (from an image, or empty) that do not exist."""
    for i, disk in enumerate(spec.disks):
        path = disk_path(config, spec, i)
        if not path.exists() and disk.create_from:
            await asyncio.to_thread(
                images.clone,
                config,
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
