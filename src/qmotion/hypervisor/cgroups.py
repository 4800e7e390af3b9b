"""Per-VM cgroups: each QEMU in a group of its own, with a CPU weight by its vCPUs, a memory
limit of its RAM plus QEMU's overhead, and a task limit (cgroup v2, or the v1 controllers).

The groups live under ``qmotion/AGENT`` in each hierarchy (as Docker's cgroupfs driver keeps
``docker/``), apart from the agent's own: an agent restart (systemd ``KillMode=process``) leaves
them, and the VMs in them, alone. Limits are what libvirt, Proxmox and KubeVirt set by default
or derive: a CPU weight proportional to vCPUs (contention is shared by size, idle CPU is not
withheld: no quota, which would also starve a migration's encryption), a hard memory limit
with room for QEMU itself (KubeVirt's model; a runaway QEMU is killed alone, not the host), and
a task limit (a guest escaping into QEMU cannot exhaust the host's PIDs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qmotion.hypervisor.errors import HypervisorError

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory", "pids")
MIB = 1 << 20
# QEMU's own memory beside the guest's: device state, I/O buffers, the migration's buffers;
# under TCG also its translated-code cache (up to 1 GiB, mapped as used).
OVERHEAD_BYTES = 256 * MIB
TCG_CODE_CACHE_BYTES = 1024 * MIB
PIDS_MAX = 1024  # QEMU's threads: vCPUs, its I/O pool (64), migration channels


@dataclass(frozen=True)
class Limits:
    cpu_weight: int  # cgroup v2 cpu.weight (1-10000, 100 is a default group's)
    memory_max: int  # bytes
    pids_max: int

    @property
    def cpu_shares(self) -> int:
        """The v1 equivalent (1024 is a default group's)."""
        return max(2, self.cpu_weight * 1024 // 100)


def limits_for(vcpus: int, memory_mib: int, accel: str) -> Limits:
    ram = memory_mib * MIB
    overhead = OVERHEAD_BYTES + ram // 8 + (TCG_CODE_CACHE_BYTES if accel == "tcg" else 0)
    return Limits(cpu_weight=min(10000, 100 * vcpus), memory_max=ram + overhead, pids_max=PIDS_MAX)


def agent_group(name: str, state_dir: Path) -> str:
    """The agent's group name: its host name and a digest of its state directory (hosts of
    two labs on one machine share names)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"qmotion/{name}-{digest}"


@dataclass(frozen=True)
class Cgroups:
    """The hierarchies this host offers: one directory (v2) or one per controller (v1)."""

    version: int
    # controller -> the directory of the agent's group in its hierarchy
    bases: dict[str, Path]
    root: Path = ROOT

    @classmethod
    def detect(cls, group: str, root: Path = ROOT) -> Cgroups | None:
        """None where no hierarchy with these controllers is writable (a container)."""
        if (root / "cgroup.controllers").is_file():
            offered = (root / "cgroup.controllers").read_text().split()
            if not set(CONTROLLERS) <= set(offered) or not os.access(root, os.W_OK):
                return None
            found = cls(2, dict.fromkeys(CONTROLLERS, root / group), root)
            try:
                # Tried here, not at the first VM: in a container with a cgroup namespace the
                # root takes no controllers for children (EBUSY), and VMs must still start.
                found._enable_v2()
            except OSError:
                return None
            return found
        bases = {c: root / c / group for c in CONTROLLERS if (root / c / "cgroup.procs").is_file()}
        if set(bases) != set(CONTROLLERS) or not all(
            os.access(root / c, os.W_OK) for c in CONTROLLERS
        ):
            return None
        return cls(1, bases, root)

    def _vm_dirs(self, vm_key: str) -> dict[str, Path]:
        return {c: base / f"vm-{vm_key}" for c, base in self.bases.items()}

    def place(self, vm_key: str, pid: int, limits: Limits) -> None:
        """Put QEMU ``pid`` (all its threads) in the VM's group, with ``limits``."""
        try:
            if self.version == 2:
                self._place_v2(vm_key, pid, limits)
            else:
                self._place_v1(vm_key, pid, limits)
        except OSError as exc:
            raise HypervisorError(f"cannot put QEMU {pid} in its cgroup: {exc}") from exc

    def _enable_v2(self) -> None:
        """Controllers enabled in every parent's subtree_control, top down, to the agent's
        group; a group with controllers enabled for children holds no process itself."""
        base = self.bases["cpu"]
        below = [d for d in reversed(base.parents) if self.root in d.parents]
        for d in [self.root, *below, base]:
            d.mkdir(exist_ok=True)
            enabled = (d / "cgroup.subtree_control").read_text().split()
            for c in CONTROLLERS:
                if c not in enabled:
                    (d / "cgroup.subtree_control").write_text(f"+{c}")

    def _place_v2(self, vm_key: str, pid: int, limits: Limits) -> None:
        self._enable_v2()  # again: a parent may have been removed since (lab down)
        vm = self._vm_dirs(vm_key)["cpu"]
        vm.mkdir(exist_ok=True)
        (vm / "cpu.weight").write_text(str(limits.cpu_weight))
        (vm / "memory.max").write_text(str(limits.memory_max))
        # Over its limit a QEMU is stopped there, not pushed to swap (and the host with it).
        with contextlib.suppress(FileNotFoundError):
            (vm / "memory.swap.max").write_text("0")
        (vm / "pids.max").write_text(str(limits.pids_max))
        (vm / "cgroup.procs").write_text(str(pid))

    def _place_v1(self, vm_key: str, pid: int, limits: Limits) -> None:
        dirs = self._vm_dirs(vm_key)
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (dirs["cpu"] / "cpu.shares").write_text(str(limits.cpu_shares))
        memory = dirs["memory"]
        # Pages QEMU touched before it was moved move with it (v1 only can).
        with contextlib.suppress(OSError):
            (memory / "memory.move_charge_at_immigrate").write_text("3")
        # Memory plus swap, the same: over its limit QEMU is stopped, not swapped out (only
        # where the kernel accounts swap: swapaccount=1). memsw may never be below the memory
        # limit: lifted first, set last (a group reused by a VM that changed size).
        memsw = memory / "memory.memsw.limit_in_bytes"
        swap_accounted = memsw.exists()
        if swap_accounted:
            memsw.write_text("-1")
        (memory / "memory.limit_in_bytes").write_text(str(limits.memory_max))
        if swap_accounted:
            memsw.write_text(str(limits.memory_max))
        (dirs["pids"] / "pids.max").write_text(str(limits.pids_max))
        for d in dirs.values():
            (d / "cgroup.procs").write_text(str(pid))

    def where(self, pid: int) -> dict[str, str]:
        """Controller (or "" for v2) -> the group path ``pid`` is in, from /proc."""
        out: dict[str, str] = {}
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
        return out

    def remove(self, vm_key: str) -> None:
        """The group of a VM whose QEMU ended (its last tasks may take a moment to leave)."""
        for d in set(self._vm_dirs(vm_key).values()):
            _rmdir(d)

    def remove_all(self) -> None:
        """The agent's groups, each VM's that is empty, and the agent's if none is left
        (``lab down``: its QEMUs are gone)."""
        for base in set(self.bases.values()):
            if base.is_dir():
                for vm in base.iterdir():
                    if vm.is_dir():
                        _rmdir(vm)
                _rmdir(base)
                _rmdir(base.parent, attempts=1)  # qmotion/, when no other agent uses it


def _rmdir(d: Path, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # EBUSY: a task is still leaving (an exiting QEMU's threads); ENOTEMPTY: children.
            if attempts == 1:
                return
            time.sleep(0.02)
