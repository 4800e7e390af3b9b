"""Scripted agents that drive the real manager in unit tests (the world is in ``cluster``)."""

from tests.unit.agent_world.cluster import (
    MIB,
    QEMU_CAPABILITIES,
    QEMU_PARAMETERS,
    FakeVm,
    Guest,
    Link,
    QmpError,
    World,
    _error,
    _facts,
    _json,
    check_capabilities,
    check_parameters,
)

__all__ = [
    "MIB",
    "QEMU_CAPABILITIES",
    "QEMU_PARAMETERS",
    "FakeVm",
    "Guest",
    "Link",
    "QmpError",
    "World",
    "_error",
    "_facts",
    "_json",
    "check_capabilities",
    "check_parameters",
]
