"""Launching a VM's QEMU: the paths it is given (monitor socket, kernel, seed) and the launch
itself, from the huge-page pool when it has room.

The VM manager decides when a VM starts and records what runs; this module only turns a spec
into a running QEMU process (in a session of its own, as its unprivileged user, confined by
seccomp, its taps handed over open).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from qmotion.agent.config import AgentConfig
from qmotion.agent.network.net import open_tap
from qmotion.agent.vms import seed
from qmotion.agent.vms.definition import check_boot_files, disk_path
from qmotion.api.vm import KernelBoot, MemoryBacking, VmSpec
from qmotion.hypervisor import process
from qmotion.hypervisor.errors import QemuStartError
from qmotion.hypervisor.qemu import LaunchPaths, build_argv, tap_name
from qmotion.hypervisor.user import QemuUser
from qmotion.image import GuestImage, cached_image, ensure_image

log = logging.getLogger(__name__)


def socket_path(config: AgentConfig, spec: VmSpec) -> Path:
    # Unix socket paths are limited to 108 bytes; state dirs can be long.
    digest = hashlib.sha256(f"{config.state_dir}:{spec.uuid}".encode()).hexdigest()[:20]
    return config.run_dir / f"{digest}.sock"


async def kernel_paths(spec: VmSpec) -> tuple[Path | None, Path | None, str]:
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
        params.update(fill=g.fill_mib, dirty=g.dirty_mib_s, check=g.check_s, disk_rate=g.disk_rate)
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


async def launch_paths(config: AgentConfig, spec: VmSpec, vm_dir: Path) -> LaunchPaths:
    """What QEMU is given of the host: its monitor socket, console log, disks, kernel and
    cloud-init seed (written here)."""
    check_boot_files(config, spec)  # also for a VM defined before the check existed
    kernel, initrd, cmdline = await kernel_paths(spec)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    paths = LaunchPaths(
        qmp_socket=socket_path(config, spec),
        console_log=vm_dir / "console.log",
        pidfile=vm_dir / "qemu.pid",
        disks=[disk_path(config, spec, i) for i in range(len(spec.disks))],
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        seed=vm_dir / "seed.iso" if spec.cloud_init is not None else None,
    )
    if paths.seed is not None:
        await asyncio.to_thread(seed.write_seed, spec, paths.seed)
    return paths


async def launch_qemu(
    spec: VmSpec,
    paths: LaunchPaths,
    accel: str,
    machine: str,
    incoming: str | None,
    pool: Path | None,
    log_path: Path,
    paused: bool = False,
    user: QemuUser | None = None,
    placed: Callable[[int], None] | None = None,
) -> tuple[int, MemoryBacking]:
    """Launch QEMU, from the huge-page pool when it had room, else from ordinary memory.

    Another guest (on this host or, in the lab, another host sharing the kernel) may take
    the pool's last pages between the check and QEMU's mapping; QEMU then fails before the
    guest runs, and the start is simply repeated without the pool. Each NIC's tap is opened
    here and inherited (QEMU, unprivileged, could not open it).
    """
    fds: list[int] = []

    def start(argv: list[str]) -> int:
        return process.launch(
            argv, paths.pidfile, log_path, spec.name, paths.qmp_socket, user, tuple(fds), placed
        )

    def argv(hugepages: Path | None) -> list[str]:
        return build_argv(
            spec,
            paths,
            accel=accel,
            machine=machine,
            incoming=incoming,
            hugepages=hugepages,
            paused=paused,
            tap_fds=fds,
        )

    try:
        for i in range(len(spec.nics)):
            fds.append(await asyncio.to_thread(open_tap, tap_name(spec, i)))
        if pool is not None:
            try:
                return await asyncio.to_thread(start, argv(pool)), "hugepages"
            except QemuStartError as exc:
                if "backing store" not in exc.stderr:
                    raise
                log.warning("VM %s: huge-page pool short, using ordinary memory", spec.name)
        return await asyncio.to_thread(start, argv(None)), "anonymous"
    finally:
        for fd in fds:
            os.close(fd)
