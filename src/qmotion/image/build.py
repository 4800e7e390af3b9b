"""Builds the test guest (Debian cloud kernel + busybox initramfs + qmguest), cached by inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qmotion.image.cc import compile_static
from qmotion.image.errors import ImageBuildError, ImageInputError
from qmotion.locks import file_lock
from qmotion.paths import cache_dir

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Only what the guest needs, in no particular order (init.sh loads them in dependency order).
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "evdev",
    "button",
)
BUILD_FORMAT = 1  # bump when the layout of the image changes without any input changing


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel``/``-initrd`` and the given command line."""

    kernel: Path
    initrd: Path
    kernel_release: str
    key: str

    def cmdline(self, **params: str | int | float) -> str:
        """Kernel command line configuring the guest (see init.sh for the keys).

        Memory workload keys: ``fill`` (MiB written at boot), ``dirty`` (MiB/s rewritten after)
        and ``hot`` (MiB: the first ``hot`` MiB of the fill are a hot set that gets half of the
        dirty rate, rewritten over and over; the other half sweeps the rest in page order).
        """
        base = "console=ttyS0 loglevel=4 panic=-1 mitigations=off"
        extra = " ".join(f"qm.{k}={v}" for k, v in sorted(params.items()))
        return f"{base} {extra}".strip()


def _run(cmd: list[str], step: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageInputError(f"{step}: command not found: {cmd[0]} (run `make setup`)") from exc
    if proc.returncode != 0:
        raise ImageBuildError(f"{step}: {' '.join(cmd)}", proc.stdout + proc.stderr)
    return proc.stdout


def _candidate_version(package: str) -> str:
    out = _run(["apt-cache", "policy", package], f"look up {package}")
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise ImageInputError(
        f"Debian package {package} has no installable version; run `apt-get update`"
    )


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], f"resolve {KERNEL_META_PACKAGE}")
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ImageInputError(
        f"cannot resolve the kernel behind {KERNEL_META_PACKAGE}; run `apt-get update`"
    )


def _source(name: str) -> bytes:
    return resources.files("qmotion.image").joinpath("guest", name).read_bytes()


def _gcc_version() -> str:
    return _run(["gcc", "-dumpfullversion"], "gcc version").strip()


def inputs() -> dict[str, str]:
    """Everything the image is made from; the cache key is their hash."""
    kernel_pkg = _kernel_package()
    return {
        "format": str(BUILD_FORMAT),
        "kernel_package": kernel_pkg,
        "kernel_version": _candidate_version(kernel_pkg),
        "busybox_version": _candidate_version(BUSYBOX_PACKAGE),
        "gcc": _gcc_version(),
        "qmguest.c": hashlib.sha256(_source("qmguest.c")).hexdigest(),
        "init.sh": hashlib.sha256(_source("init.sh")).hexdigest(),
    }


def _key(inp: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inp, sort_keys=True).encode()).hexdigest()[:16]


def _load(directory: Path) -> GuestImage | None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    image = GuestImage(
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_release=data["kernel_release"],
        key=data["key"],
    )
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def cached_image() -> GuestImage | None:
    """The newest image already built, without consulting apt (for hot paths like the agent)."""
    root = cache_dir() / "images"
    current = root / "current"
    return _load(current.resolve()) if current.exists() else None


def ensure_image(force: bool = False) -> GuestImage:
    """Return the guest image for the current inputs, building it if needed."""
    inp = inputs()
    key = _key(inp)
    root = cache_dir() / "images"
    with file_lock(root / ".lock"):
        return _ensure_locked(root, key, inp, force)


def _ensure_locked(root: Path, key: str, inp: dict[str, str], force: bool) -> GuestImage:
    target = root / key
    if not force:
        existing = _load(target)
        if existing is not None:
            _point_current(root, key)
            return existing
    with tempfile.TemporaryDirectory(prefix=f"build-{key}-", dir=root) as tmp:
        work = Path(tmp)
        image_dir = work / "out"
        image_dir.mkdir()
        release = _build(work, image_dir, inp)
        (image_dir / "manifest.json").write_text(
            json.dumps({"key": key, "kernel_release": release, "inputs": inp}, indent=2) + "\n"
        )
        # Publish atomically so concurrent builders and readers never see a half-built image.
        if target.exists():
            shutil.rmtree(target)
        os.rename(image_dir, target)
    _point_current(root, key)
    image = _load(target)
    if image is None:
        raise ImageBuildError("publish image", f"{target} is incomplete after the build")
    return image


def _point_current(root: Path, key: str) -> None:
    current = root / "current"
    if current.is_symlink() and os.readlink(current) == key:
        return
    link_tmp = root / f".current-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(key)
    os.replace(link_tmp, current)


def _build(work: Path, out: Path, inp: dict[str, str]) -> str:
    debs = work / "debs"
    debs.mkdir()
    # apt-get download drops privileges to _apt, which cannot write into our private temp dir.
    os.chmod(work, 0o755)
    os.chmod(debs, 0o777)
    _run(
        [
            "apt-get",
            "download",
            "-q",
            f"{inp['kernel_package']}={inp['kernel_version']}",
            f"{BUSYBOX_PACKAGE}={inp['busybox_version']}",
        ],
        "download Debian packages",
        cwd=debs,
    )
    kroot, broot = work / "kernel", work / "busybox"
    for deb in debs.glob("*.deb"):
        dest = broot if deb.name.startswith(BUSYBOX_PACKAGE) else kroot
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpack {deb.name}")

    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageBuildError("find kernel", f"no vmlinuz in {inp['kernel_package']}")
    release = vmlinuz[-1].name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz[-1], out / "vmlinuz")

    rootfs = work / "rootfs"
    for sub in ("bin", "dev", "proc", "sys", "tmp", "lib/qm", "etc"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(broot / "bin" / "busybox", rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    init = rootfs / "init"
    init.write_bytes(_source("init.sh"))
    os.chmod(init, 0o755)

    shutil.copyfile(compile_static("qmguest", _source("qmguest.c")), rootfs / "bin" / "qmguest")
    os.chmod(rootfs / "bin" / "qmguest", 0o755)

    moddir = kroot / "lib" / "modules" / release
    for name in GUEST_MODULES:
        found = list(moddir.rglob(f"{name}.ko"))
        if not found:
            raise ImageBuildError("collect modules", f"module {name}.ko not in {release}")
        shutil.copyfile(found[0], rootfs / "lib" / "qm" / f"{name}.ko")

    # The kernel opens /dev/console for init before devtmpfs is mounted.
    os.mknod(rootfs / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    with open(out / "initrd.img", "wb") as fh:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible"],
            cwd=rootfs,
            input="\n".join([".", *files]) + "\n",
            stdout=fh,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise ImageBuildError("pack initramfs", proc.stderr)
    return release
