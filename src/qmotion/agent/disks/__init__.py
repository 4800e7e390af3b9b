"""Disks that move: Storage vMotion on one host, the shared-nothing NBD mirror between two,
and cold transfers of a stopped VM's disks.

May import ``qmotion.agent.vms`` (the VMs whose disks move), the agent's base and network
rooms, ``qmotion.hypervisor`` (QEMU block jobs) and ``qmotion.api``; never ``migration``.
"""
