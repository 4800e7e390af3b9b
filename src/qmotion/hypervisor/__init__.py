"""QEMU processes and their QMP monitors: command lines, launch, probing, monitoring."""
