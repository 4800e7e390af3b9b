"""A local multi-host lab: hosts as network namespaces on one switch bridge, each with an agent."""

from qmotion.lab.errors import LabError, LabExists, LabInputError, LabNotFound, LabSetupError
from qmotion.lab.lab import Lab, LabHost, LabRecord, lab_down, lab_up, load_lab

__all__ = [
    "Lab",
    "LabError",
    "LabExists",
    "LabHost",
    "LabInputError",
    "LabNotFound",
    "LabRecord",
    "LabSetupError",
    "lab_down",
    "lab_up",
    "load_lab",
]
