"""The scripted agent's routes that answer for one migration, by its id (issue 22's contract):
progress, cancel, release, resume, a destination's teardown, the word that lets a paused
destination run, its confirmation, and the postcopy stream's reconnection.

As the agent (qmotion.agent.migration: outgoing.stats, confirm, finish): with ``migration=M``
QEMU's figures are M's only if the VM's record names M (else status ``none``); an outgoing
``completed`` counts only with QEMU in ``postmigrate``; a copy that left in another migration
is a ``stale_copy`` (never resumed, never released for M); a destination is removed only if it
arrived by M and never ran (not even
for a moment before it stopped). Without an id each route answers as before ids existed.
"""

from __future__ import annotations

import time

import httpx

from qmotion.api.errors import AgentErrorCode
from qmotion.api.migration import MigrationStats
from tests.unit.agent_world.cluster import Cluster, FakeVm
from tests.unit.agent_world.qemu import GUEST_BYTES
from tests.unit.agent_world.wire import _error, _json

IDLE = ("none", "completed", "failed", "cancelled")
LEFT = ("postmigrate", "finish-migrate")  # a stream took (or is taking) the guest away
NEVER_RAN = ("inmigrate", "paused", "gone")


def _none() -> httpx.Response:
    """No migration by that id here."""
    return _json(MigrationStats(status="none").model_dump(mode="json"))


def _other(vm: FakeVm, migration: str | None) -> bool:
    return migration is not None and vm.current != migration


def stats(world: Cluster, name: str, vm: FakeVm, req: httpx.Request) -> httpx.Response:
    """GET migration: progress (QEMU moves on as it is asked, see Cluster)."""
    migration = req.url.params.get("migration")
    if _other(vm, migration):
        return _none()
    if vm.precopy is not None:
        world._wait(vm, req)
    if vm.migration == "active" and vm.precopy is None:
        vm.polls += 1
        vm.transferred = min(GUEST_BYTES, vm.transferred + GUEST_BYTES // 4)
        long_enough = time.monotonic() - vm.started >= world.duration_s
        if vm.polls >= world.polls_to_complete and long_enough:
            world.complete(name)
    elif vm.migration == "postcopy-active" and vm.outgoing is not None:
        vm.polls += 1
        if vm.polls >= world.polls_to_complete:
            world.complete(name)  # the pages left: QEMU completes the postcopy
    elif vm.migration == "cancelling":
        world._settle_cancel(name, vm)
    body = world._stats(vm)
    if migration is not None and vm.outgoing is not None:
        body["status"] = vm.outgoing_status()
    return _json(body)


def cancel(world: Cluster, vm: FakeVm, req: httpx.Request) -> httpx.Response:
    migration = req.url.params.get("migration")
    if _other(vm, migration):
        return _none()  # another migration's: nothing touched
    if vm.migration.startswith("postcopy") or (vm.outgoing and vm.outgoing.postcopy):
        return _error(
            409, AgentErrorCode.IN_POSTCOPY, f"VM {vm.spec.name} is in postcopy", vm.spec.name
        )
    if vm.migration in ("active", "device"):
        vm.migration = "cancelling"
    return _json(world._stats(vm))


def _last(vm: FakeVm) -> str:
    return "an unrecorded one" if vm.outgoing is None else str(vm.outgoing.id)


def release(world: Cluster, host: str, name: str, vm: FakeVm, req: httpx.Request) -> httpx.Response:
    migration = req.url.params.get("migration")
    if vm.migration.startswith("postcopy"):
        return _error(409, AgentErrorCode.IN_POSTCOPY, f"VM {name} is in postcopy", vm=name)
    if vm.runstate != "postmigrate":
        return _error(
            409, AgentErrorCode.CONFLICT, f"VM {name} is {vm.runstate} here, not migrated"
        )
    out = vm.outgoing
    if migration is not None and (
        out is None or out.id != migration or vm.migration != "completed"
    ):
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"VM {name} did not complete migration {migration} (last: {_last(vm)})",
            vm=name,
        )
    if vm.mirror == "completed":
        # The copies run elsewhere now: the old files go.
        world.files[host] -= {f"{d.datastore}:{d.path}" for d in vm.spec.disks}
    del world.vms[host][name]
    return httpx.Response(204)


def resume(vm: FakeVm, name: str, req: httpx.Request) -> httpx.Response:
    """qmotion.agent.migration.confirm.SourceConfirm.resume."""
    migration = req.url.params.get("migration")
    after_failed = req.url.params.get("after_failed_switchover") == "true"
    left = vm.runstate in LEFT or vm.migration.startswith("postcopy")
    if migration is not None and left and (vm.outgoing is None or vm.outgoing.id != migration):
        return _error(
            409,
            AgentErrorCode.STALE_COPY,
            f"VM {name} here went away in migration {_last(vm)}, not in {migration}",
            vm=name,
        )
    if vm.migration.startswith("postcopy"):
        return _error(409, AgentErrorCode.IN_POSTCOPY, f"VM {name} is in postcopy", vm=name)
    if vm.runstate == "gone":
        # The agent's monitor of a QEMU that exited: nothing to resume (its VmManager
        # answers 409, never a status).
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} has no QEMU here", vm=name)
    if vm.outgoing is not None and vm.outgoing.postcopy:
        return _error(
            409, AgentErrorCode.MIGRATED_AWAY, f"VM {name} migrated away in postcopy", vm=name
        )
    switched = vm.migration == "completed" and (migration is None or left)
    if switched and not after_failed:
        return _error(409, AgentErrorCode.MIGRATED_AWAY, f"VM {name} completed its migration away")
    if vm.migration not in IDLE:
        return _error(
            409, AgentErrorCode.CONFLICT, f"VM {name} is still migrating ({vm.migration})"
        )
    if vm.runstate == "finish-migrate":
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is still switching over")
    if vm.runstate in ("paused", "postmigrate"):
        vm.runstate = "running"
    vm.mirror = None  # it runs on its own disks: any copy is void
    return _json({"qemu_status": vm.runstate})


def delete(world: Cluster, host: str, name: str, vm: FakeVm, req: httpx.Request) -> httpx.Response:
    """DELETE a VM; with ``migration``, only that migration's destination that never ran.
    As the agent's VmManager.delete: a VM whose QEMU is alive goes only with ``force``."""
    migration = req.url.params.get("migration")
    if vm.runstate != "gone" and req.url.params.get("force") != "true":
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"VM {name} is {vm.runstate}; stop it first or delete with force",
            vm=name,
        )
    if migration is not None:
        if vm.incoming is None or vm.incoming.id != migration:
            return _error(
                409,
                AgentErrorCode.CONFLICT,
                f"VM {name} here is not the destination of migration {migration}",
                vm=name,
            )
        if vm.incoming.ran or vm.runstate not in NEVER_RAN:
            return _error(
                409,
                AgentErrorCode.CONFLICT,
                f"VM {name} runs here ({vm.runstate}): never deleted as a failed destination",
                vm=name,
            )
    del world.vms[host][name]
    world.files[host] -= set(vm.owned)  # an unfinished copy's disks go with it
    if vm.runstate == "inmigrate":
        world._stream_lost(name, vm)
    return httpx.Response(204)


def finish(world: Cluster, host: str, name: str, vm: FakeVm, req: httpx.Request) -> httpx.Response:
    """The word (agent.migration.finish.DestinationFinish.finish): the destination of M runs
    now if its stream is loaded, else once it is."""
    migration = req.url.params.get("migration")
    if vm.incoming is None or vm.incoming.id != migration:
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"VM {name} here is not the destination of migration {migration}",
            vm=name,
        )
    if vm.runstate == "gone" or vm.migration in ("failed", "cancelled"):
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"the incoming migration {migration} of {name} failed here: nothing to run",
            vm=name,
        )
    vm.incoming.finish = True
    loaded = vm.migration == "completed" or vm.migration.startswith("postcopy")
    if loaded and vm.incoming.start == "paused" and vm.runstate == "paused":
        vm.run_here()
    return _json(world._info(host, vm).model_dump(mode="json"))


def keep_disks(vm: FakeVm, name: str, req: httpx.Request) -> httpx.Response:
    """The manager saw the VM run here: its copies are its own; with the id, it is confirmed
    (its incoming record goes)."""
    migration = req.url.params.get("migration")
    if migration is not None and vm.incoming is not None and vm.incoming.id != migration:
        return _error(
            409,
            AgentErrorCode.CONFLICT,
            f"VM {name} here arrived by migration {vm.incoming.id}, not {migration}",
            vm=name,
        )
    vm.owned = []
    if migration is not None and vm.incoming is not None:
        vm.arrived, vm.incoming = vm.incoming.id, None
    return httpx.Response(204)


def recover_incoming(vm: FakeVm, name: str, req: httpx.Request) -> httpx.Response:
    """Postcopy: the destination listens again (the stream of the scripted world never
    breaks: it answers where it listens)."""
    if not vm.migration.startswith("postcopy"):
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is not in postcopy", vm=name)
    return _json({"uri": "tcp:198.18.0.2:4444"})


def reconnect(world: Cluster, vm: FakeVm, name: str) -> httpx.Response:
    """Postcopy: the source sends the stream on (already flowing here: its figures)."""
    if not vm.migration.startswith("postcopy") and vm.migration != "completed":
        return _error(409, AgentErrorCode.CONFLICT, f"VM {name} is not in postcopy", vm=name)
    return _json(world._stats(vm))
