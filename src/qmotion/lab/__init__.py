"""A local multi-host lab: hosts as network namespaces on one switch bridge, each with an agent.

Starts the manager and agents as processes and reaches them through ``qmotion.client``; may
import ``qmotion.hypervisor`` (the huge-page pool), ``qmotion.image`` and the ground floor,
never the manager's or the agent's code.
"""

from qmotion.lab.errors import LabError, LabExists, LabInputError, LabNotFound, LabSetupError
from qmotion.lab.lab import Lab, lab_up
from qmotion.lab.record import LabHost, LabRecord, load_lab
from qmotion.lab.teardown import lab_down

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
