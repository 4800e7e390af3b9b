"""Chooses KVM or TCG by a real probe boot, cached per machine boot; never a silent choice.

``/dev/kvm`` existing (and even ``query-kvm`` saying enabled) does not mean guests run: under
broken nested virtualisation the kernel hangs right after decompression. So the probe boots the
test guest with ``qm.probe=1`` and waits for it to reach userspace.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from qmotion.api.host import AccelInfo
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.qemu import QEMU, qemu_info
from qmotion.hypervisor.user import QemuUser
from qmotion.image import GuestImage
from qmotion.locks import file_lock
from qmotion.paths import cache_dir

PROBE_MARKER = "QMOTION-PROBE-OK"
PROBE_TIMEOUT_S = 15.0
PROBE_CPU = "qemu64"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(
    image: GuestImage, timeout_s: float = PROBE_TIMEOUT_S, user: QemuUser | None = None
) -> tuple[bool, str]:
    """Boot the guest under KVM, as the user VMs run as; True only if it reached userspace
    in time."""
    if user is not None and not user.may_use(Path("/dev/kvm"), 6):
        return False, f"/dev/kvm is not open to QEMU's user {user.name} (add it to group kvm)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not available"
    if user is not None:
        try:
            for boot in (image.kernel, image.initrd):
                user.reach(boot, [cache_dir()])
                user.share(boot)
        except (HypervisorError, OSError) as exc:
            return False, f"the probe guest is closed to QEMU's user: {exc}"
    with tempfile.TemporaryDirectory(prefix="qmotion-probe-") as tmp:
        log = Path(tmp) / "console.log"
        if user is not None:
            log.touch()
            user.own(log)
            user.open_dir(Path(tmp))
        argv = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            "pc,accel=kvm",
            "-cpu",
            PROBE_CPU,
            "-m",
            "256",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            image.cmdline(probe=1),
            "-serial",
            f"file:{log}",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            **(user.popen_options() if user is not None else {}),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return False, f"KVM probe boot did not reach userspace within {timeout_s:.0f} s"
        elapsed = time.monotonic() - start
        text = log.read_text(errors="replace") if log.exists() else ""
        if PROBE_MARKER in text:
            return True, f"KVM probe boot reached userspace in {elapsed:.1f} s"
        detail = (err or "").strip().splitlines()[-1:] or ["no output"]
        return False, f"KVM probe boot failed (exit {proc.returncode}): {detail[0]}"


def choose_accel(
    requested: str, image_provider: Callable[[], GuestImage], user: QemuUser | None = None
) -> AccelInfo:
    """``requested`` is auto, kvm or tcg; auto probes (cached for this boot of the machine)."""
    if requested == "tcg":
        return AccelInfo(name="tcg", reason="TCG requested by configuration")
    if requested == "kvm":
        return AccelInfo(name="kvm", reason="KVM requested by configuration (not probed)")
    image = image_provider()
    key = {
        "boot_id": _boot_id(),
        "qemu": qemu_info().version,
        "kernel": image.key,
        "user": user.name if user is not None else "",
    }
    cache = cache_dir() / "accel-probe.json"
    # Agents of one lab start together; one probes, the others read its result.
    with file_lock(cache_dir() / ".accel-probe.lock"):
        return _choose_locked(image, key, cache, user)


def _choose_locked(
    image: GuestImage, key: dict[str, str], cache: Path, user: QemuUser | None
) -> AccelInfo:
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return AccelInfo.model_validate(cached["result"])
    except (OSError, ValueError, KeyError):
        pass
    ok, why = probe_kvm(image, user=user)
    result = AccelInfo(
        name="kvm" if ok else "tcg",
        reason=why if ok else f"falling back to TCG: {why}",
        probed_at=datetime.now(UTC),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "result": result.model_dump(mode="json")}))
    os.replace(tmp, cache)
    return result
