"""``qmotion image build debian``: a BIOS-bootable Debian 12 qcow2 with cloud-init.

Built from Debian packages only (the cloud kernel, systemd, cloud-init), cached by its inputs.

How: ``mmdebstrap`` makes the root file system (variant ``minbase`` plus the cloud kernel,
systemd, cloud-init, ifupdown, a DHCP client, python3 for the guest's own tools) as a tarball;
it is unpacked into an ext4 partition of a raw disk (a loop device), ``extlinux`` is installed
as the boot loader with syslinux's MBR, and the disk is converted to qcow2 (holes kept).
cloud-init is told to use only the NoCloud datasource (qmotion's seed), so a first boot does
not wait on cloud metadata services that are not there; the serial console gets the kernel's
messages and a login prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qmotion.image.errors import ImageBuildError, ImageInputError
from qmotion.locks import file_lock
from qmotion.paths import cache_dir
from qmotion.probe.guest import ECHO_PORT

SUITE = "bookworm"
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "cloud-init",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "iproute2",
    "python3",
    "ca-certificates",
)
DISK_MIB = 2048
BUILD_FORMAT = 2  # bump when the image's layout changes without any input changing
MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
EXTLINUX_CONF = """DEFAULT debian
TIMEOUT 1
PROMPT 0
LABEL debian
  LINUX /boot/{kernel}
  INITRD /boot/{initrd}
  APPEND root=LABEL=qmroot ro console=ttyS0 net.ifnames=0 mitigations=off
"""
CLOUD_CFG = """# qmotion: the seed is NoCloud (a cidata disk); nothing else to wait for.
datasource_list: [ NoCloud, None ]
"""
# cloud-config lines (vm create --user-data) that give the guest a service to talk to: a TCP
# echo server on the port qmotion's probes use (qmotion.probe.guest.ECHO_PORT), as a unit.
ECHO_SERVICE = """write_files:
  - path: /usr/local/bin/qm-echo
    permissions: '0755'
    content: |
      #!/usr/bin/python3
      import socketserver
      class Echo(socketserver.BaseRequestHandler):
          def handle(self):
              while data := self.request.recv(65536):
                  self.request.sendall(data)
      socketserver.ThreadingTCPServer.allow_reuse_address = True
      socketserver.ThreadingTCPServer(("", ECHO_PORT), Echo).serve_forever()
  - path: /etc/systemd/system/qm-echo.service
    content: |
      [Unit]
      Description=qmotion echo service
      [Service]
      ExecStart=/usr/local/bin/qm-echo
      Restart=always
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, qm-echo.service]
""".replace("ECHO_PORT", str(ECHO_PORT))


def _run(cmd: list[str], step: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageInputError(f"{step}: command not found: {cmd[0]} (run `make setup`)") from exc
    if proc.returncode != 0:
        raise ImageBuildError(f"{step}: {' '.join(cmd)}", (proc.stdout + proc.stderr)[-4000:])
    return proc.stdout


def inputs() -> dict[str, str]:
    return {
        "suite": SUITE,
        "packages": ",".join(PACKAGES),
        "disk_mib": str(DISK_MIB),
        "extlinux": EXTLINUX_CONF,
        "cloud_cfg": CLOUD_CFG,
        "format": str(BUILD_FORMAT),
    }


def _key(inp: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inp, sort_keys=True).encode()).hexdigest()[:16]


def ensure_debian(force: bool = False) -> Path:
    """The Debian 12 image for the current inputs (a qcow2 path), built if needed."""
    inp = inputs()
    key = _key(inp)
    root = cache_dir() / "debian"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"debian12-{key}.qcow2"
    with file_lock(root / ".lock"):
        if target.is_file() and not force:
            return target
        with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
            built = _build(Path(tmp))
            os.replace(built, target)
    return target


@contextlib.contextmanager
def _loop(raw: Path, offset: int, size: int) -> Iterator[str]:
    """The partition as a loop device of its own (no partition nodes in a container)."""
    dev = _run(
        [
            "losetup",
            "--find",
            "--show",
            f"--offset={offset}",
            f"--sizelimit={size}",
            str(raw),
        ],
        "attach the partition",
    ).strip()
    try:
        yield dev
    finally:
        # A device left attached holds the image open: retried, then named in the error.
        for _ in range(5):
            done = subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
            if done.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise ImageBuildError("detach the partition", f"losetup --detach {dev} failed")


@contextlib.contextmanager
def _mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    _run(["mount", dev, str(where)], "mount the root file system")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode:
            # Busy for a moment (a process still closing a file): detached when it lets go,
            # so the build's folder is never removed through a mounted file system.
            subprocess.run(["umount", "--lazy", str(where)], check=False, capture_output=True)


def _build(work: Path) -> Path:
    if not MBR.is_file():
        raise ImageInputError(f"{MBR} is missing: install syslinux-common (run `make setup`)")
    rootfs = work / "rootfs.tar"
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            "--aptopt=Acquire::Retries 3",
            SUITE,
            str(rootfs),
        ],
        "mmdebstrap the root file system",
    )
    raw = work / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(DISK_MIB << 20)
    table = subprocess.run(
        ["sfdisk", "--quiet", str(raw)],
        input="label: dos\nstart=2048, type=83, bootable\n",
        text=True,
        check=False,
        capture_output=True,
    )
    if table.returncode != 0:
        raise ImageBuildError("partition the disk", table.stderr)
    start = 2048 * 512
    with _loop(raw, start, (DISK_MIB << 20) - start) as part:
        _run(["mkfs.ext4", "-q", "-L", "qmroot", "-O", "^64bit", part], "make the file system")
        with _mounted(part, work / "mnt") as mnt:
            # Owners by number (not mapped to this host's users), capabilities kept.
            _run(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "--xattrs-include=*",
                    "-xf",
                    str(rootfs),
                    "-C",
                    str(mnt),
                ],
                "unpack the root file system",
            )
            boot = mnt / "boot"
            kernel = sorted(p.name for p in boot.glob("vmlinuz-*"))
            initrd = sorted(p.name for p in boot.glob("initrd.img-*"))
            if not kernel or not initrd:
                raise ImageBuildError("find the kernel", f"/boot has {os.listdir(boot)}")
            (boot / "extlinux").mkdir(exist_ok=True)
            (boot / "extlinux" / "extlinux.conf").write_text(
                EXTLINUX_CONF.format(kernel=kernel[-1], initrd=initrd[-1])
            )
            _run(["extlinux", "--install", str(boot / "extlinux")], "install extlinux")
            (mnt / "etc" / "fstab").write_text("LABEL=qmroot / ext4 defaults 0 1\n")
            (mnt / "etc" / "hostname").write_text("debian\n")
            cfg = mnt / "etc" / "cloud" / "cloud.cfg.d" / "90_qmotion.cfg"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(CLOUD_CFG)
            # The first boot's machine id comes from systemd, not from the build.
            (mnt / "etc" / "machine-id").write_text("")
    # The MBR's boot code (the partition table after it stays): it loads the active
    # partition's boot sector, which extlinux wrote.
    with open(raw, "r+b") as disk, open(MBR, "rb") as mbr:
        disk.write(mbr.read(440))
    out = work / "debian12.qcow2"
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], "convert to qcow2")
    shutil.rmtree(work / "mnt", ignore_errors=True)
    return out
