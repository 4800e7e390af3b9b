"""A VM on this host: its definition, QEMU process and record (re-attachable after an agent
restart), the ids of its migrations (which one QEMU's migration status is), and what a
definition makes its disks from (an image, a cloud-init seed).

May import the agent's facts and network rooms and its base, ``qmotion.hypervisor``,
``qmotion.image`` and ``qmotion.api``; never ``disks`` or ``migration``, which build on it.
"""
