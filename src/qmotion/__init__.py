"""qmotion: live migration and cluster automation for QEMU/KVM virtual machines."""

__version__ = "0.1.0"
