"""Launching daemonized QEMU processes and finding, signalling and reaping them by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from qmotion.hypervisor.errors import QemuStartError


def launch(argv: list[str], pidfile: Path, log: Path, vm: str) -> int:
    """Run QEMU with ``-daemonize``; returns the daemon's PID once QEMU is initialised.

    Daemonized QEMU is not the agent's child, so it outlives an agent restart and is found
    again through its pidfile; QEMU exits its launcher only after setup succeeded, so a zero
    exit means the monitor socket is already listening.

    A daemonized QEMU points its stderr at /dev/null once set up, so a later error (an
    assertion, "terminating on signal") would be lost; with ``-D`` it keeps writing there.
    QEMU truncates that file, hence a second one: ``log`` keeps the start-up errors.
    """
    pidfile.unlink(missing_ok=True)
    argv = [*argv, "-D", str(runtime_log(log))]
    with open(log, "ab") as err:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            check=False,
            start_new_session=True,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise QemuStartError(f"QEMU exited with status {proc.returncode}", vm=vm, stderr=tail)
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise QemuStartError(f"QEMU started but left no pidfile at {pidfile}", vm=vm) from exc


def runtime_log(log: Path) -> Path:
    """Where a running QEMU's errors go (next to its start-up log)."""
    return log.with_name(f"{log.stem}-run{log.suffix}")


def is_qemu_of(pid: int, vm_uuid: uuid.UUID) -> bool:
    """True if ``pid`` is alive and is the QEMU of this VM (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return str(vm_uuid).encode() in cmdline


def wait_gone(pid: int, vm_uuid: uuid.UUID, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_qemu_of(pid, vm_uuid):
            return True
        time.sleep(0.05)
    return not is_qemu_of(pid, vm_uuid)


def kill(pid: int, vm_uuid: uuid.UUID, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; only ever signals the QEMU of this VM."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not is_qemu_of(pid, vm_uuid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, vm_uuid, timeout_s):
            return


def is_nbd(pid: int) -> bool:
    """True if ``pid`` is alive and is a qemu-nbd (PIDs get reused)."""
    try:
        return b"qemu-nbd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def end_nbd_exports(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, each ``qemu-nbd`` among ``pids`` (PIDs get reused: anything
    else is left alone). Returns the PIDs still alive."""

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if is_nbd(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(is_nbd(p) for p in pids):
            time.sleep(0.05)
    return [p for p in pids if is_nbd(p)]
