"""Launching QEMU processes, each in a session of its own; finding, signalling, reaping them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from qmotion.hypervisor.errors import QemuStartError
from qmotion.hypervisor.user import QemuUser


def launch(
    argv: list[str],
    pidfile: Path,
    log: Path,
    vm: str,
    qmp_socket: Path,
    user: QemuUser | None = None,
    pass_fds: tuple[int, ...] = (),
    placed: Callable[[int], None] | None = None,
) -> int:
    """Run QEMU in its own session; returns its PID once QEMU is initialised.

    QEMU is not daemonized (``-daemonize`` forks and calls setsid after the seccomp filter is
    in place, which ``-sandbox spawn=deny,elevateprivileges=deny`` forbids); it is started in a
    session of its own instead, so it outlives an agent restart (systemd's ``KillMode=process``
    signals only the agent) and is found again through its pidfile. It is ready when its
    monitor answers a command (see ``_greets``).

    Its stdout and stderr stay on ``log`` for its whole life; ``-D`` keeps QEMU's own log
    messages in a second file, as before.

    With ``user``, QEMU runs as that user; the files it writes beside its VM's definition
    (pidfile, log) are made here, its own, in a directory it cannot write. ``placed`` is
    called with its PID as soon as it exists (its cgroup, before it allocates guest memory);
    if that fails, QEMU is killed.
    """
    pidfile.unlink(missing_ok=True)
    argv = [*argv, "-D", str(runtime_log(log))]
    if user is not None:
        for own in (pidfile, runtime_log(log)):
            own.touch()
            user.own(own)
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*user.exec_prefix(), *argv] if user is not None else argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    if placed is not None:
        try:
            placed(proc.pid)
        except BaseException:
            kill_child(proc)
            raise
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        rc = proc.poll()
        if rc is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise QemuStartError(f"QEMU exited with status {rc}", vm=vm, stderr=tail)
        if _greets(qmp_socket):
            break
        if time.monotonic() > deadline:
            kill_child(proc)
            raise QemuStartError(
                f"QEMU did not answer on its monitor within {START_TIMEOUT_S:.0f} s", vm=vm
            )
        time.sleep(GREET_POLL_S)
    _STARTED.append(proc)
    _reap()
    return proc.pid


START_TIMEOUT_S = 120.0
# QEMU answers its monitor ~30 ms after it starts here: a coarser poll adds half of itself
# to every start (a migration's destination waits for it).
GREET_POLL_S = 0.005
# QEMUs this agent started, kept to be reaped when they end (not to leave zombies while the
# agent runs; an agent restart hands them to init).
_STARTED: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    _STARTED[:] = [p for p in _STARTED if p.poll() is None]


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _greets(qmp_socket: Path) -> bool:
    """True once QEMU answers a command on its monitor. The greeting alone is not enough:
    QEMU's I/O thread may greet before setup is done; ``query-status`` runs on the main
    thread, so its answer means setup finished. QEMU takes the monitor back when this
    connection closes, for the agent's."""
    if not qmp_socket.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(qmp_socket))
            f = sock.makefile("rwb")
            if not f.readline():
                return False
            for command in (b"qmp_capabilities", b"query-status"):
                f.write(b'{"execute": "' + command + b'"}\n')
                f.flush()
                while True:  # events may come first
                    line = f.readline()
                    if not line:
                        return False
                    if b'"return"' in line or b'"error"' in line:
                        break
            return True
        except OSError:
            return False


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
            break
    _reap()


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
