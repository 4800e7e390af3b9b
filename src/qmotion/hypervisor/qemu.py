"""What the local QEMU binary offers, and the command line that runs a VM spec with it."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qmotion.api.vm import DiskBoot, KernelBoot, VmSpec
from qmotion.hypervisor.errors import HypervisorError

QEMU = "qemu-system-x86_64"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class QemuInfo:
    version: str
    machine_types: list[str]
    machine_aliases: dict[str, str]
    cpu_models: list[str]


def _capture(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HypervisorError(f"cannot run {args[0]}: {exc} (run `make setup`)") from exc


@functools.cache
def qemu_info(binary: str = QEMU) -> QemuInfo:
    version_out = _capture([binary, "--version"])
    m = re.search(r"version (\S+)", version_out)
    version = m.group(1) if m else version_out.strip()
    machines: list[str] = []
    aliases: dict[str, str] = {}
    for line in _capture([binary, "-machine", "help"]).splitlines()[1:]:
        parts = line.split(None, 1)
        if not parts or parts[0] == "none":
            continue
        machines.append(parts[0])
        am = re.search(r"\(alias of ([^)]+)\)", line)
        if am:
            aliases[parts[0]] = am.group(1)
    return QemuInfo(version, machines, aliases, _cpu_models(_capture([binary, "-cpu", "help"])))


def _cpu_models(text: str) -> list[str]:
    """Model names from ``-cpu help``: QEMU 7 prints ``x86 NAME ...`` lines, QEMU 9 and
    later an ``Available CPUs:`` list of indented ``NAME ...`` lines (then CPUID flags)."""
    models: list[str] = []
    listing = False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.append(parts[1])
        elif line.startswith("Available CPUs"):
            listing = True
        elif listing and line.startswith("  ") and parts:
            models.append(parts[0])
        elif listing:
            listing = False
    return models


def resolve_machine(machine: str, info: QemuInfo) -> str:
    """Versioned machine type: migration needs both sides on the identical machine version."""
    return info.machine_aliases.get(machine, machine)


@dataclass(frozen=True)
class LaunchPaths:
    qmp_socket: Path
    console_log: Path
    pidfile: Path
    disks: list[Path] = field(default_factory=list)
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    seed: Path | None = None  # the cloud-init NoCloud seed (spec.cloud_init), a CD-ROM


def tap_name(spec: VmSpec, index: int) -> str:
    """Stable per VM and NIC, at most 15 characters (IFNAMSIZ), same on every host."""
    return f"qm{spec.uuid.hex[:9]}n{index}"


def build_argv(
    spec: VmSpec,
    paths: LaunchPaths,
    *,
    accel: str,
    machine: str,
    incoming: str | None = None,
    hugepages: Path | None = None,
    binary: str = QEMU,
    paused: bool = False,
    tap_fds: list[int] | None = None,
) -> list[str]:
    """The QEMU command line for ``spec``. Pure: the same inputs always give the same argv.

    ``tap_fds``: each NIC's tap, opened by the caller and inherited by QEMU (which then needs
    neither ``/dev/net/tun`` nor the right to attach a tap: it runs unprivileged); without
    them QEMU opens each tap by name.

    Devices get explicit ids and PCI addresses so that a destination started from the same
    spec has a device layout identical to the source's, which migration requires.
    """
    argv = [
        binary,
        "-name",
        f"guest={spec.name},debug-threads=on",
        "-uuid",
        str(spec.uuid),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        f"{machine},accel={accel}" + (",memory-backend=pc.ram" if hugepages else ""),
        "-cpu",
        spec.cpu_model,
        "-m",
        str(spec.memory),
        "-smp",
        str(spec.vcpus),
        "-qmp",
        f"unix:{paths.qmp_socket},server=on,wait=off",
        "-chardev",
        f"file,id=console0,path={paths.console_log},append=on",
        "-serial",
        "chardev:console0",
        "-pidfile",
        str(paths.pidfile),
        "-msg",
        "timestamp=on",
        # Seccomp: no obsolete system calls, no set*uid, no fork/exec, no scheduler or
        # affinity changes: a guest escaping into QEMU gets no further than QEMU's own needs.
        "-sandbox",
        SANDBOX,
    ]
    if hugepages is not None:
        argv += [
            "-object",
            f"memory-backend-file,id=pc.ram,size={spec.memory}M,mem-path={hugepages},share=off",
        ]
    for i, nic in enumerate(spec.nics):
        # An inherited tap takes no name and no scripts (QEMU refuses them with fd=).
        tap = (
            f"fd={tap_fds[i]}"
            if tap_fds is not None
            else f"ifname={tap_name(spec, i)},script=no,downscript=no"
        )
        argv += [
            "-netdev",
            f"tap,id=net{i},{tap}",
            "-device",
            f"{nic.model},netdev=net{i},mac={nic.mac},id=nic{i},bus=pci.0,addr={0x3 + i:#x}",
        ]
    boot_disk = next((i for i, d in enumerate(spec.disks) if d.bootable), 0)
    for i, (disk, path) in enumerate(zip(spec.disks, paths.disks, strict=True)):
        bootindex = ",bootindex=1" if isinstance(spec.boot, DiskBoot) and i == boot_disk else ""
        # JSON, not QEMU's key=value syntax: a path is data, never more options (a comma
        # in ``a,filename=/dev/sda`` would otherwise re-point the disk).
        file_node = {
            "driver": "file",
            "filename": str(path),
            "node-name": f"file{i}",
            "cache": {"direct": False},
        }
        format_node = {"driver": disk.format, "file": f"file{i}", "node-name": f"disk{i}"}
        argv += [
            "-blockdev",
            json.dumps(file_node),
            "-blockdev",
            json.dumps(format_node),
            "-device",
            f"virtio-blk-pci,drive=disk{i},id=vblk{i},bus=pci.0,addr={0x10 + i:#x}{bootindex}",
        ]
    if spec.cloud_init is not None and paths.seed is not None:
        # The i440fx's second IDE channel: the same slot on every host, for migration.
        argv += [
            "-drive",
            f"file={paths.seed},if=none,id=seed,format=raw,readonly=on,media=cdrom",
            "-device",
            "ide-cd,drive=seed,id=seedcd,bus=ide.1,unit=0",
        ]
    if isinstance(spec.boot, KernelBoot):
        if paths.kernel is None:
            raise HypervisorError("kernel boot without a kernel path", vm=spec.name)
        argv += ["-kernel", str(paths.kernel)]
        if paths.initrd is not None:
            argv += ["-initrd", str(paths.initrd)]
        argv += ["-append", paths.cmdline]
    if incoming is not None:
        argv += ["-incoming", incoming]
    if paused:
        # A migration's destination: QEMU loads the stream and stays paused until ``cont``.
        argv += ["-S"]
    return argv
