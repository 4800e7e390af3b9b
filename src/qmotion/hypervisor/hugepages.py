"""The host's pool of 2 MiB huge pages, used to back guest RAM when it has room.

Why guests are backed by huge pages when a pool exists (measured on the lab machine, see
docs/migration.md):
a migration destination spends most of its time faulting in fresh memory. This machine is itself
a VM whose kernel returns free memory to its hypervisor (free page reporting), so the first
touch of 1 GiB of fresh anonymous memory costs 3.6 s, the second 0.15 s; a migration of a
1 GiB guest took 3.3-4 s, all of it in the destination's kernel. Pages in the huge-page pool
are not free memory to the kernel, are never reported, and stay backed: a destination whose RAM
comes from a warmed pool receives the same guest in well under a second. Reserving huge pages
for guests is also what production hosts do (libvirt ``<hugepages/>``, Nova
``hw:mem_page_size``), for TLB reach.

The pool is host configuration, like a sysctl: :func:`ensure_pool` only ever grows it, and a
guest falls back to ordinary memory when the pool is short (QEMU reserves huge pages when it maps
guest RAM, so a short pool fails QEMU's start cleanly rather than faulting the guest later).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = 2 << 20
_SYSFS = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
OWN_MOUNT = Path("/run/qmotion/hugepages")


@dataclass(frozen=True)
class Pool:
    total: int
    free: int
    reserved: int
    mount: Path | None

    @property
    def available_bytes(self) -> int:
        """What a new guest can still get: free pages not already promised to a mapping."""
        return max(0, self.free - self.reserved) * PAGE_SIZE


def _read(name: str) -> int:
    try:
        return int((_SYSFS / name).read_text())
    except (OSError, ValueError):
        return 0


def mount_point() -> Path | None:
    """A hugetlbfs mount with 2 MiB pages, if the host has one."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        options = fields[3].split(",")
        if any(o.startswith("pagesize=") and o != "pagesize=2M" for o in options):
            continue
        return Path(fields[1])
    return None


def read_pool() -> Pool:
    return Pool(
        total=_read("nr_hugepages"),
        free=_read("free_hugepages"),
        reserved=_read("resv_hugepages"),
        mount=mount_point(),
    )


def backing_path(memory_mib: int) -> Path | None:
    """Where to map a guest of ``memory_mib`` from, or None for ordinary memory."""
    pool = read_pool()
    if pool.mount is None or pool.available_bytes < memory_mib << 20:
        return None
    return pool.mount


def _mount() -> Path:
    found = mount_point()
    if found is not None:
        return found
    OWN_MOUNT.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "hugetlbfs", str(OWN_MOUNT)],
        check=True,
        capture_output=True,
    )
    return OWN_MOUNT


def warm(mount: Path, pages: int) -> float:
    """Fault in ``pages`` free pool pages once so their memory is backed; returns seconds.

    The kernel zeroes a huge page when it is first mapped, which is what makes the hypervisor
    below back it; afterwards the page returns to the pool and stays backed.
    """
    if pages <= 0:
        return 0.0
    t0 = time.monotonic()
    path = mount / f".qmotion-warm-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        size = pages * PAGE_SIZE
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as m:
            for off in range(0, size, PAGE_SIZE):
                m[off] = 0
    finally:
        os.close(fd)
    return time.monotonic() - t0


def ensure_pool(total_bytes: int) -> Pool:
    """Grow the pool to at least ``total_bytes`` and warm the pages it gained.

    Never shrinks it: pages in use by running guests cannot be taken back, and a pool shrunk and
    grown again would be cold.
    """
    mount = _mount()
    want = -(-total_bytes // PAGE_SIZE)
    before = read_pool()
    if before.total < want:
        (_SYSFS / "nr_hugepages").write_text(f"{want}\n")
        after = read_pool()
        # Warm every page not promised to a guest: the ones just gained are cold, and touching
        # a warm one again costs a zeroing only.
        warm(mount, after.free - after.reserved)
    return read_pool()
