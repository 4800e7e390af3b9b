"""QEMU's unprivileged user is handed exactly what it needs: files it writes become its own,
files it reads become readable by its group, and only the agent's own directories are opened
on the way (real user, real files)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import OperationFailed
from qmotion.agent.vms.access import QemuAccess
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.qemu import LaunchPaths
from qmotion.hypervisor.user import QemuUser, lookup

NAME = "qmotion-qemu"


@pytest.fixture
def user() -> QemuUser:
    return QemuUser.lookup(NAME)


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qmotion-user-"))
    d.chmod(0o711)
    old = os.umask(0o077)
    try:
        yield d
    finally:
        os.umask(old)
        shutil.rmtree(d, ignore_errors=True)


def _as_user(user: QemuUser, *argv: str) -> int:
    """What the user itself can do, asked of the kernel (not of our mode arithmetic)."""
    return subprocess.run(list(argv), check=False, **user.popen_options()).returncode


def _ids(status: str) -> dict[str, list[str]]:
    fields = (line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        k: v.split()
        for k, v in fields
        if k
        in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    }


def test_setpriv_drops_to_exactly_what_popen_would(user: QemuUser) -> None:
    """QEMU starts through setpriv (a vfork, not a fork of the agent): the kernel must see
    the same ids (real, effective, saved, file system), groups and no capabilities."""
    argv = ["cat", "/proc/self/status"]
    through_popen = subprocess.run(
        argv, check=False, capture_output=True, text=True, **user.popen_options()
    )
    through_setpriv = subprocess.run(
        [*user.exec_prefix(), *argv], check=False, capture_output=True, text=True
    )
    assert through_setpriv.returncode == 0, through_setpriv.stderr
    want = _ids(through_popen.stdout)
    assert _ids(through_setpriv.stdout) == want
    assert want["Uid"] == [str(user.uid)] * 4 and want["CapEff"] == ["0000000000000000"]
    no_groups = QemuUser(user.name, user.uid, user.gid, ())
    alone = subprocess.run(
        [*no_groups.exec_prefix(), *argv], capture_output=True, text=True, check=True
    )
    assert _ids(alone.stdout)["Groups"] == []


def test_a_missing_user_is_named_with_how_to_create_it() -> None:
    with pytest.raises(HypervisorError, match="useradd --system"):
        QemuUser.lookup("qmotion-no-such-user")
    assert lookup("root") is None and lookup(None) is None


def test_a_file_it_writes_becomes_its_own_and_nobody_elses(user: QemuUser, base: Path) -> None:
    disk = base / "store" / "vm" / "disk.raw"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o644)
    assert _as_user(user, "dd", "if=/dev/zero", f"of={disk}", "count=1", "conv=notrunc") != 0
    user.reach(disk, [base / "store"])
    user.own(disk)
    assert _as_user(user, "dd", "if=/dev/zero", f"of={disk}", "count=1", "conv=notrunc") == 0
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600
    # The way to it is searchable by QEMU's group only, never listable.
    for d in (base / "store", base / "store" / "vm"):
        st = d.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, user.gid), d
    assert _as_user(user, "ls", str(base / "store")) != 0


def test_a_file_it_reads_is_its_groups_to_read_only(user: QemuUser, base: Path) -> None:
    kernel = base / "cache" / "vmlinuz"
    kernel.parent.mkdir()
    kernel.write_bytes(b"k")
    user.reach(kernel, [base / "cache"])
    user.share(kernel)
    st = kernel.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, user.gid, 0o640)
    assert _as_user(user, "cat", str(kernel)) == 0
    assert _as_user(user, "touch", str(kernel)) != 0
    # Readable by everyone already (a cache built under umask 022): left as it is.
    public = base / "cache" / "initrd"
    public.write_bytes(b"i")
    public.chmod(0o644)
    user.share(public)
    assert (public.stat().st_gid, stat.S_IMODE(public.stat().st_mode)) == (0, 0o644)


def test_a_closed_directory_above_the_agents_own_is_named_not_opened(
    user: QemuUser, base: Path
) -> None:
    private = base / "home"
    private.mkdir(mode=0o700)
    disk = private / "store" / "disk.raw"
    disk.parent.mkdir()
    disk.touch()
    with pytest.raises(HypervisorError, match=f"directory {private} ") as info:
        user.reach(disk, [private / "store"])
    assert "chmod o+x" in str(info.value)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700  # untouched


def test_a_directory_of_another_group_is_opened_for_search_by_others_only(
    user: QemuUser, base: Path
) -> None:
    staff = base / "staff"
    staff.mkdir()
    staff.chmod(0o750)
    os.chown(staff, -1, 50)  # group staff: its members keep their access
    user.reach(staff / "disk.raw", [staff])
    st = staff.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (50, 0o751)


def test_the_run_directory_takes_its_sockets_but_shows_it_none(user: QemuUser, base: Path) -> None:
    run = base / "run"
    run.mkdir(mode=0o700)
    user.open_dir(run, write=True)
    st = run.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (user.gid, 0o1730)
    assert _as_user(user, "touch", str(run / "vm.sock")) == 0
    assert _as_user(user, "ls", str(run)) != 0
    other = run / "other.sock"
    other.touch()
    assert _as_user(user, "rm", "-f", str(other)) != 0  # sticky: not another's entry
    assert other.exists()


def test_root_is_refused_as_qemus_user() -> None:
    assert pwd.getpwnam("root").pw_uid == 0
    with pytest.raises(HypervisorError, match="confines nothing"):
        QemuUser.lookup("root")


def test_a_link_or_a_device_is_never_handed_over(user: QemuUser, base: Path) -> None:
    secret = base / "secret"
    secret.write_text("root's")
    link = base / "disk.raw"
    link.symlink_to(secret)
    for give in (user.own, user.share):
        with pytest.raises(HypervisorError, match="symbolic link"):
            give(link)
    with pytest.raises(HypervisorError, match="not a plain file"):
        user.share(Path("/dev/null"))
    st = secret.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_a_shared_file_is_not_writable_by_qemus_group(user: QemuUser, base: Path) -> None:
    image = base / "base.qcow2"
    image.write_bytes(b"x")
    image.chmod(0o660)  # QEMU's group could write it (handed over as a disk before)
    os.chown(image, -1, user.gid)
    assert _as_user(user, "touch", str(image)) == 0
    user.share(image)
    assert stat.S_IMODE(image.stat().st_mode) == 0o640
    assert _as_user(user, "touch", str(image)) != 0


def _access(base: Path) -> tuple[QemuAccess, Path]:
    store = base / "store"
    store.mkdir(exist_ok=True)
    config = AgentConfig(
        name="h9",
        state_dir=base / "state",
        token="t",
        run_dir=base / "run",
        datastores=(DatastoreConfig("s", store, False),),
        qemu_user=NAME,
    )
    config.state_dir.mkdir(exist_ok=True)
    return QemuAccess(config), store


def _paths(disk: Path, base: Path) -> LaunchPaths:
    vm_dir = base / "state" / "vms" / "v"
    vm_dir.mkdir(parents=True, exist_ok=True)
    return LaunchPaths(
        qmp_socket=base / "run" / "q.sock",
        console_log=vm_dir / "console.log",
        pidfile=vm_dir / "qemu.pid",
        disks=[disk],
    )


def test_a_backing_file_outside_the_datastores_is_not_handed_over(base: Path) -> None:
    """QEMU owns its disk and can rewrite the image's header: the backing file it names is
    checked again at every start, not trusted."""
    access, store = _access(base)
    outside = base / "state" / "tls-key.pem"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(b"\0" * 65536)
    disk = store / "v" / "disk.qcow2"
    disk.parent.mkdir()
    made = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw", str(disk)],
        capture_output=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    with pytest.raises(OperationFailed, match="outside this host's datastores"):
        access.for_launch("v", _paths(disk, base), ["qcow2"])
    st = outside.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_a_disk_that_links_out_of_its_datastore_is_refused(base: Path) -> None:
    access, store = _access(base)
    elsewhere = base / "elsewhere.raw"
    elsewhere.write_bytes(b"\0" * 4096)
    disk = store / "v" / "disk.raw"
    disk.parent.mkdir()
    disk.symlink_to(elsewhere)
    with pytest.raises(OperationFailed, match="outside this host's datastores"):
        access.for_launch("v", _paths(disk, base), ["raw"])
    assert elsewhere.stat().st_uid == 0
    # Inside the datastore, through a link, is the file itself that becomes QEMU's.
    real = store / "v" / "real.raw"
    real.write_bytes(b"\0" * 4096)
    inner = store / "v" / "inner.raw"
    inner.symlink_to(real)
    access.for_launch("v", _paths(inner, base), ["raw"])
    assert real.stat().st_uid == pwd.getpwnam(NAME).pw_uid


def test_a_link_on_the_way_opens_nothing_outside_the_roots(user: QemuUser, base: Path) -> None:
    outside = base / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret").chmod(0o700)
    root = base / "store"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(HypervisorError, match="closed to it"):
        user.reach(root / "link" / "secret" / "disk.raw", [root])
    st = (outside / "secret").stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_a_directory_opened_to_qemus_group_is_not_listable_by_it(
    user: QemuUser, base: Path
) -> None:
    d = base / "vms"
    d.mkdir()
    d.chmod(0o750)  # root's group could list it
    user.open_dir(d)
    st = d.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (user.gid, 0o710)
    assert _as_user(user, "ls", str(d)) != 0


def test_a_base_image_qemu_owned_as_a_disk_is_taken_back(user: QemuUser, base: Path) -> None:
    image = base / "was-a-disk.qcow2"
    image.write_bytes(b"x")
    user.own(image)
    assert _as_user(user, "touch", str(image)) == 0
    user.share(image)
    st = image.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, user.gid, 0o640)
    assert _as_user(user, "touch", str(image)) != 0
    assert _as_user(user, "cat", str(image)) == 0


def test_an_image_keeping_its_data_in_a_host_file_is_refused(base: Path) -> None:
    access, store = _access(base)
    outside = base / "host-file"
    outside.write_bytes(b"\0" * 65536)
    disk = store / "v" / "disk.qcow2"
    disk.parent.mkdir()
    made = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={outside}", str(disk), "64K"],
        capture_output=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    with pytest.raises(OperationFailed, match="keeps its data in"):
        access.for_launch("v", _paths(disk, base), ["qcow2"])
    with pytest.raises(OperationFailed, match="keeps its data in"):
        access.check_chain("v", disk, "qcow2")  # before a cold export, as root
    st = outside.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_a_chain_inside_the_datastore_is_handed_over_read_only(base: Path) -> None:
    access, store = _access(base)
    lib = store / ".images"
    lib.mkdir()
    image = lib / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    disk = store / "v" / "disk.qcow2"
    disk.parent.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(disk)],
        check=True,
    )
    access.for_launch("v", _paths(disk, base), ["qcow2"])
    user = access.user
    assert user is not None
    assert disk.stat().st_uid == user.uid
    st = image.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode) & 0o070) == (0, user.gid, 0o040)
    # What QEMU itself does with it: reads the chain, as that user.
    read = subprocess.run(
        ["qemu-img", "info", "--backing-chain", str(disk)],
        capture_output=True,
        check=False,
        **user.popen_options(),
    )
    assert read.returncode == 0, read.stderr
