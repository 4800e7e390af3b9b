"""Errors of QEMU process and QMP handling.

HypervisorError
 ├── QemuStartError    QEMU refused to start (its stderr is attached)
 ├── QmpError          a QMP command failed (the command and QEMU's error class are attached)
 └── QmpUnavailable    the QMP socket cannot be reached (QEMU gone or not yet listening)
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class HypervisorError(QmotionError):
    """Root of the hypervisor package's errors."""

    def __init__(self, message: str, *, vm: str | None = None) -> None:
        super().__init__(message)
        self.vm = vm


class QemuStartError(HypervisorError):
    def __init__(self, message: str, *, vm: str | None = None, stderr: str = "") -> None:
        super().__init__(f"{message}: {stderr.strip()[-1500:]}" if stderr else message, vm=vm)
        self.stderr = stderr


class QmpError(HypervisorError):
    def __init__(self, command: str, qmp_class: str, desc: str, *, vm: str | None = None) -> None:
        super().__init__(f"QMP {command} failed: {qmp_class}: {desc}", vm=vm)
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


class QmpUnavailable(HypervisorError):
    """The monitor cannot be reached."""
