"""qmotion: live migration and cluster automation for QEMU/KVM virtual machines.

The packages and the layer rule they follow (imports go downwards only) are described in
docs/architecture.md and checked by tests/unit/test_layers.py.
"""

__version__ = "0.1.0"
