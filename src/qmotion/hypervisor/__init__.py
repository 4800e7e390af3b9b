"""QEMU processes and their QMP monitors: command lines, launch, probing, monitoring, and the
QEMU block jobs and qemu-img queries both of the agent's disk movers use.

Imports only the ground floor (``qmotion.api``, paths, locks, errors) and ``qmotion.image``:
it knows nothing of the agent that drives it.
"""
