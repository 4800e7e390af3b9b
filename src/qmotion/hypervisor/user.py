"""The unprivileged user QEMU runs as, and the files it is handed (ownership, as libvirt's DAC).

QEMU is started as this user by the agent (setpriv drops to it before ``exec``):
``-run-with user=`` would have QEMU call ``setuid`` itself, which the seccomp filter's
``elevateprivileges=deny`` forbids (QEMU 10.0 dies of SIGSYS). From then on QEMU opens only
what this user may: the files a VM writes (its disks, console log, saved state) are owned by
it; what it only reads (kernel, initrd, backing images, TLS credentials) is readable by its
group; directories on the way are searchable (never listable) by that group.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmotion.hypervisor.errors import HypervisorError

DEFAULT_USER = "qmotion-qemu"
CREATE_HINT = (
    "create it (`make setup` does: useradd --system --no-create-home --shell "
    "/usr/sbin/nologin {name}) or name another with --qemu-user"
)


@dataclass(frozen=True)
class QemuUser:
    name: str
    uid: int
    gid: int
    # Supplementary groups (kvm for /dev/kvm on hosts where QEMU uses it).
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> QemuUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise HypervisorError(
                f"QEMU's user {name!r} does not exist: {CREATE_HINT.format(name=name)}"
            ) from None
        if entry.pw_uid == 0:
            raise HypervisorError(f"QEMU's user {name!r} is root: that confines nothing")
        groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
        return cls(name, entry.pw_uid, entry.pw_gid, groups)

    def popen_options(self) -> dict[str, Any]:
        """``subprocess.Popen`` keywords that run the child as this user, with its groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def exec_prefix(self) -> list[str]:
        """The same drop as ``popen_options`` (real, effective, saved and file-system ids;
        these groups only), done by util-linux's setpriv just before it execs the command.
        For a command started often from the agent: Python cannot vfork a child it must
        setuid, and forking the agent (its memory's page tables) took ~10 ms of every start.
        """
        groups = (
            [f"--groups={','.join(map(str, self.groups))}"] if self.groups else ["--clear-groups"]
        )
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups, "--"]

    def _may(self, st: os.stat_result, bits: int) -> bool:
        """Whether this user has ``bits`` (a mask of r=4, w=2, x=1) on a file, by its mode."""
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid == self.uid:
            return (mode >> 6) & bits == bits
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return (mode >> 3) & bits == bits
        return mode & bits == bits

    def may_use(self, path: Path, bits: int) -> bool:
        try:
            return self._may(path.stat(), bits)
        except OSError:
            return False

    @contextlib.contextmanager
    def _handle(self, path: Path, kind: int) -> Iterator[tuple[str, os.stat_result]]:
        """The file itself, never what a link names (a link planted where a disk is expected
        would hand its target, ``/etc/shadow`` or ``/dev/sda``, to QEMU): opened without
        following, checked by its descriptor, changed through it (nothing swapped in
        between is touched)."""
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != kind:
                link = stat.S_ISLNK(st.st_mode)
                what = "a symbolic link" if link else "not a plain file or directory"
                raise HypervisorError(f"{path} is {what}: not handed to QEMU's user {self.name}")
            yield f"/proc/self/fd/{fd}", st
        finally:
            os.close(fd)

    def own(self, path: Path) -> None:
        """QEMU writes ``path``: it becomes this user's, and its only (a guest's data is
        nobody else's to read, whatever umask made the file)."""
        with self._handle(path, stat.S_IFREG) as (handle, st):
            os.chown(handle, self.uid, self.gid)
            os.chmod(handle, stat.S_IMODE(st.st_mode) & 0o700)

    def share(self, path: Path) -> None:
        """QEMU reads ``path`` and may not write it: readable by this user's group, owned by
        root if QEMU owned it (a base image that was a disk before), unless everyone may read
        it already (a file of the image cache) and QEMU may not write it."""
        with self._handle(path, stat.S_IFREG) as (handle, st):
            if self._may(st, 4) and not self._may(st, 2):
                return
            os.chown(handle, 0 if st.st_uid == self.uid else -1, self.gid)
            os.chmod(handle, (stat.S_IMODE(st.st_mode) & 0o740) | 0o040)

    def open_dir(self, path: Path, *, write: bool = False) -> None:
        """Let QEMU pass through directory ``path`` (and, ``write``, make entries in it):
        through the group when the directory's group is root's or QEMU's (which then may not
        list it), else through "others" (search only: names must be known)."""
        bits = 3 if write else 1
        with self._handle(path, stat.S_IFDIR) as (handle, st):
            if self._may(st, bits):
                return
            mode = stat.S_IMODE(st.st_mode)
            if st.st_gid in (0, self.gid):
                os.chown(handle, -1, self.gid)
                sticky = stat.S_ISVTX if write else 0
                os.chmod(handle, (mode & ~0o070) | (bits << 3) | sticky)
            elif write:
                raise HypervisorError(
                    f"QEMU runs as {self.name}, which cannot write in {path} "
                    f"(mode {mode:04o}, group {st.st_gid})"
                )
            else:
                os.chmod(handle, mode | 0o001)

    def reach(self, path: Path, roots: Sequence[Path]) -> None:
        """Make every directory above ``path`` searchable by QEMU, changing only those within
        ``roots`` (the agent's own: state, run, datastore and cache directories). Any other
        that is closed is an error naming it: the agent never opens a directory it does not
        own (a datastore under /root would otherwise open /root). Paths and roots are
        resolved first: a link on the way leads nowhere the roots do not cover."""
        path = path.resolve()
        within = [r.resolve() for r in roots]
        for d in reversed(path.parents):
            if self.may_use(d, 1):
                continue
            if any(d == r or r in d.parents for r in within):
                self.open_dir(d)
                continue
            try:
                st = d.stat()
                how = f"mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}"
            except OSError as exc:
                how = str(exc)
            raise HypervisorError(
                f"QEMU runs as {self.name}, which cannot reach {path}: directory {d} "
                f"({how}) is closed to it. Make it searchable (chmod o+x {d}) or keep VM "
                "files elsewhere"
            )


def lookup(name: str | None) -> QemuUser | None:
    """None: QEMU runs as the agent's own user (only when asked for, as ``root``)."""
    if name is None or name == "root":
        return None
    return QemuUser.lookup(name)
