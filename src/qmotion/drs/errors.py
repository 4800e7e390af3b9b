"""Errors of the DRS engine.

DrsError
 └── SnapshotError    the snapshot is invalid: names the entry (host, VM or rule) and why;
                      no plan is made from it
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class DrsError(QmotionError):
    """Root of the DRS errors."""


class SnapshotError(DrsError):
    def __init__(self, entry: str, message: str) -> None:
        super().__init__(f"{entry}: {message}")
        self.entry = entry
        self.reason = message
