"""What a VM's QEMU, running as the unprivileged QEMU user, is handed of the host: the way to
its files, its disks (its own), boot files, seed and backing images (readable), its monitor's
directory and huge pages.

Nothing else of the host is open to it: the agent's state directory and the VM directories in
it are searchable by QEMU's group but not listable; definitions, runtime records and keys other
than the TLS credentials QEMU reads stay root's own (0600).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path

from qmotion.agent.config import AgentConfig
from qmotion.agent.errors import OperationFailed
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.qemu import LaunchPaths
from qmotion.hypervisor.user import QemuUser, lookup
from qmotion.paths import cache_dir

log = logging.getLogger(__name__)


class QemuAccess:
    """Hands files to QEMU's user; does nothing when QEMU runs as the agent's own user."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.user: QemuUser | None = lookup(config.qemu_user)

    def roots(self) -> list[Path]:
        """The directories the agent owns and may open a way through (never above them)."""
        return [
            self.config.state_dir,
            self.config.run_dir,
            cache_dir(),
            *(d.path for d in self.config.datastores),
        ]

    def prepare(self) -> None:
        """At start-up: QEMU makes its monitor socket in the run directory (writable, sticky,
        not listable by it) and passes through the state directory to its VM's."""
        if self.user is None:
            return
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        (self.config.state_dir / "vms").mkdir(parents=True, exist_ok=True)
        self._reach(self.config.run_dir / "qmp.sock")
        self.user.open_dir(self.config.run_dir, write=True)
        self._reach(self.config.state_dir / "vms" / "any")
        self._devices()

    def _devices(self) -> None:
        """Postcopy needs a userfaultfd, which an unprivileged process gets only from
        ``/dev/userfaultfd`` (Linux 6.1; the system call is root's unless a sysctl opens it to
        every user): its group becomes QEMU's, as libvirt grants it to its QEMU."""
        assert self.user is not None
        uffd = Path("/dev/userfaultfd")
        if not uffd.exists() or self.user.may_use(uffd, 6):
            return
        st = uffd.stat()
        if st.st_gid not in (0, self.user.gid):
            log.warning("%s belongs to group %d: postcopy needs QEMU's user in it", uffd, st.st_gid)
            return
        os.chown(uffd, -1, self.user.gid)
        os.chmod(uffd, stat.S_IMODE(st.st_mode) | 0o060)

    def _reach(self, path: Path) -> None:
        assert self.user is not None
        try:
            self.user.reach(path, self.roots())
        except HypervisorError as exc:
            raise OperationFailed(str(exc), field="qemu_user") from exc

    def _real(self, path: Path, within: list[Path], what: str) -> Path:
        """``path`` resolved, and inside one of ``within``: a link (or a backing file name in
        an image's header, which QEMU can rewrite) never hands QEMU a file elsewhere, such
        as the agent's keys or a host device."""
        real = path.resolve(strict=True)
        if not any(real.is_relative_to(r.resolve()) for r in within):
            raise OperationFailed(
                f"{what} {path} is {real}, outside this host's datastores: not handed to QEMU",
                field="disks",
            )
        return real

    def _datastores(self) -> list[Path]:
        return [d.path for d in self.config.datastores]

    def check_chain(self, vm: str, disk: Path, fmt: str) -> None:
        """A disk about to be exported (qemu-nbd, as root, follows its header): its backing
        files in the datastores, no external data file."""
        backing_chain(vm, disk, fmt, self._datastores())

    def for_launch(self, vm: str, paths: LaunchPaths, formats: list[str]) -> None:
        """Before QEMU starts: its console log and disks become its own; kernel, initrd,
        seed and every backing image readable; each reachable."""
        user = self.user
        if user is None:
            return
        try:
            self._reach(paths.console_log)
            paths.console_log.touch()
            user.own(paths.console_log)
            for disk, fmt in zip(paths.disks, formats, strict=True):
                self.disk(disk)
                backing_chain(vm, disk, fmt, self._datastores(), user)
            boots = [(paths.kernel, [*self._datastores(), cache_dir()], "kernel or initrd")]
            boots += [(paths.initrd, boots[0][1], boots[0][2])]
            boots += [(paths.seed, [self.config.state_dir], "seed")]
            for boot, within, what in boots:
                if boot is not None:
                    real = self._real(boot, within, what)
                    self._reach(real)
                    user.share(real)
        except (OSError, HypervisorError) as exc:
            raise OperationFailed(f"VM {vm}: {exc}", vm=vm, field="qemu_user") from exc

    def disk(self, path: Path) -> None:
        """A disk QEMU writes (also a storage move's new target, added while it runs)."""
        if self.user is not None:
            try:
                real = self._real(path, self._datastores(), "disk")
                self._reach(real)
                self.user.own(real)
            except (OSError, HypervisorError) as exc:
                raise OperationFailed(f"{path}: {exc}", field="qemu_user") from exc

    def saved_state(self, path: Path) -> None:
        """The file a suspend writes (made here, empty, so QEMU needs no write on the
        datastore's directory), or that a resume reads."""
        if self.user is not None:
            try:
                folder = self._real(path.parent, self._datastores(), "saved state")
                # Made here, never through a link (O_NOFOLLOW), then checked and handed over.
                os.close(
                    os.open(folder / path.name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
                )
                real = self._real(folder / path.name, self._datastores(), "saved state")
                self._reach(real)
                self.user.own(real)
            except (OSError, HypervisorError) as exc:
                raise OperationFailed(f"{path}: {exc}", field="qemu_user") from exc

    def hugepages(self, mount: Path) -> Path:
        """QEMU makes (and unlinks at once) its memory file in a directory of its own on the
        hugetlbfs mount, not in the mount itself (root's)."""
        if self.user is None:
            return mount
        own = mount / self.user.name
        try:
            own.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(own)  # not a link someone made there
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, self.user.uid):
                raise OperationFailed(f"{own} is not a directory of root's or QEMU's user")
            os.chown(own, self.user.uid, self.user.gid, follow_symlinks=False)
            os.chmod(own, 0o700)
        except OSError as exc:
            raise OperationFailed(f"huge pages for QEMU's user: {exc}") from exc
        return own


MAX_CHAIN = 16


def backing_chain(
    vm: str, disk: Path, fmt: str, datastores: list[Path], user: QemuUser | None = None
) -> list[Path]:
    """The images under ``disk``, nearest first, each checked before anything reads it:
    QEMU owns its disk and can rewrite its header to name any file as backing or data file.
    Each layer is read alone (``qemu-img info`` without ``--backing-chain`` opens no backing
    file), as ``user`` when given (then a header naming a host file fails to open); every
    backing file must resolve to a plain file in a datastore; an external data file is
    refused. With ``user``, each checked layer is shared with it before it is read."""
    out: list[Path] = []
    layer, layer_fmt = disk, fmt
    while layer_fmt == "qcow2":
        if len(out) >= MAX_CHAIN:
            raise OperationFailed(f"{disk}: a backing chain over {MAX_CHAIN} images", vm=vm)
        proc = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(layer)],
            capture_output=True,
            text=True,
            check=False,
            **(user.popen_options() if user is not None else {}),
        )
        if proc.returncode != 0:
            raise OperationFailed(f"cannot read {layer}: {proc.stderr.strip()}", vm=vm)
        info = json.loads(proc.stdout)
        specific = (info.get("format-specific") or {}).get("data") or {}
        if specific.get("data-file"):
            raise OperationFailed(
                f"{layer} keeps its data in {specific['data-file']}: refused", vm=vm, field="disks"
            )
        name = info.get("full-backing-filename") or info.get("backing-filename")
        if not name:
            break
        if name.startswith("json:") or ":" in name.split("/", 1)[0]:
            raise OperationFailed(f"{layer} names its backing as {name}: refused", vm=vm)
        path = Path(name) if Path(name).is_absolute() else layer.parent / name
        try:
            real = path.resolve(strict=True)
        except OSError as exc:
            raise OperationFailed(f"{layer}'s backing file {name}: {exc}", vm=vm) from exc
        if not any(real.is_relative_to(d.resolve()) for d in datastores) or not real.is_file():
            raise OperationFailed(
                f"{layer}'s backing file {name} is {real}, outside this host's datastores",
                vm=vm,
                field="disks",
            )
        if user is not None:
            user.reach(real, datastores)
            user.share(real)
        out.append(real)
        declared = info.get("backing-filename-format")
        layer, layer_fmt = real, declared or _probe_format(real)
    return out


def _probe_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
