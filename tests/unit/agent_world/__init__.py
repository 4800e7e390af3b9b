"""Scripted host agents served in-process (httpx MockTransport) for the manager's real port.

The world keeps, per host, each VM's QEMU run state and migration status, and answers the
agent API as the real agent does (qmotion.agent.migration.migrate): ``resume`` refuses a VM that
migrated away (409 ``migrated_away``) or is still migrating, ``release`` refuses unless QEMU
is ``postmigrate``, a cancelled migration ends the destination's incoming QEMU. Like QEMU, a
migration completes only from ``active``: once ``cancelling`` it ends ``cancelled``.

Issue 22's contract, as the agent answers it: each VM's migration record (which migration its
QEMU's status belongs to, by the manager's id; it survives ``World.restart_agent``), answers
for that id only (``ids``: a ``stale_copy`` is never resumed, a destination is deleted only by
its id and never once it ran), a destination started paused (``-S``) that runs on the word
(the source agent's at completion, the manager's ``finish``), postcopy (``tune``), and agents
that are ``down`` (no answer, no word) as well as ``unreachable`` (from the manager only).

Tests inject the races that matter through ``before_request``: complete the migration, or
make a host unreachable, just before the k-th request, for every k; ``fail_next`` makes a
route answer an error status instead, once per queued status.

Convergence. A VM given a scripted ``Guest`` (``World.guests``) migrates as QEMU 10's pre-copy
does, paced by a simulated clock (``World.clock``, whose ``monotonic`` a test hands to the
task runner as its clock) over a scripted ``Link``; other VMs complete after
``polls_to_complete`` progress queries, as before. The agent's side is the real one: what the
scripted agents tell their QEMU is ``qmotion.agent.migration.params``' own
``stream_capabilities``, ``stream_parameters`` and ``tune_parameters``, and the scripted QEMU
refuses what QEMU refuses (migrate_params_check, migrate_caps_check). QEMU's part: cluster.py.

The package, bottom up (each module imports only those before it, and qmotion): ``qemu`` (the
scripted QEMU's settings and pre-copy state), ``wire`` (what an agent answers with), ``cluster``
(the hosts, their VMs and QEMU's progress), ``storage_moves`` (Storage vMotion on one host),
``migrations``, ``nbd`` and ``ids`` (the agent's migration, disk and per-migration routes),
``agent`` (the agent's API, routing to them) and ``world`` (the World tests drive: the seam
and the manager's side, ``World.runner`` on the simulated clock). Tests import from the
package, as below.
"""

from __future__ import annotations

from tests.unit.agent_world.cluster import Cluster, FakeVm
from tests.unit.agent_world.qemu import (
    GUEST_BYTES,
    MIB,
    PAGE,
    QEMU_CAPABILITIES,
    QEMU_ENUM_PARAMETERS,
    QEMU_PARAMETERS,
    FakeQemu,
    Guest,
    Link,
    Precopy,
    QmpError,
    SimClock,
    check_capabilities,
    check_parameters,
)
from tests.unit.agent_world.wire import _error, _facts, _json
from tests.unit.agent_world.world import World

__all__ = [
    "GUEST_BYTES",
    "MIB",
    "PAGE",
    "QEMU_CAPABILITIES",
    "QEMU_ENUM_PARAMETERS",
    "QEMU_PARAMETERS",
    "Cluster",
    "FakeQemu",
    "FakeVm",
    "Guest",
    "Link",
    "Precopy",
    "QmpError",
    "SimClock",
    "World",
    "_error",
    "_facts",
    "_json",
    "check_capabilities",
    "check_parameters",
]
