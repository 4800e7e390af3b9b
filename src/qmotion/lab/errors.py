"""Errors of the lab.

LabError
 ├── LabExists       a lab by that name is already up (nothing was changed)
 ├── LabNotFound     no lab by that name (nothing to do)
 ├── LabInputError   bad arguments (host count, RTT, bandwidth, name)
 └── LabSetupError   a step of ``lab up`` failed; everything it made was torn down
"""

from __future__ import annotations

from qmotion.errors import QmotionError


class LabError(QmotionError):
    """Root of the lab's errors."""


class LabExists(LabError):
    pass


class LabNotFound(LabError):
    pass


class LabInputError(LabError):
    pass


class LabSetupError(LabError):
    pass
