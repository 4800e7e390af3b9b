"""The campaign's invariants.

At every moment (``moment``, on every agent request): at most one running copy of each VM; a
copy never runs with memory older than what another copy ran since (``Memory``: the guest
would lose the writes it made since); no file that a defined VM uses is gone.

At the end, once the faults stopped, every task ended and reconcile settled what it could
(``final_violations``): each VM runs exactly once, where the inventory says, on the disks the
inventory names, its arrival confirmed; nothing is left defined on a host, and no disk file is
left on a datastore, that no record names (the inventory, a task's leftovers, warnings or
error, the VM's attention mark, an agent's open record of a storage move of a marked VM); no
agent holds a VM the inventory does not know, and no agent holds a storage move open on a VM
that is not marked (it refuses to migrate it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qmotion.api.vm import Disk, VmSpec
from qmotion.server.db import Database, Task, Vm
from tests.unit.agent_world import Cluster, FakeVm
from tests.unit.agent_world.storage_moves import unresolved

UNNAMING = frozenset({"old_files", "new_files"})


@dataclass
class Memory:
    """The guest's memory across its copies: each start of a copy is an epoch, and a copy
    holds the epoch of the memory it has (its own last run's, or its source's at the
    switchover). Copies are known by identity (kept here, so no id is reused)."""

    epochs: dict[str, int] = field(default_factory=dict)  # VM -> its latest epoch
    held: dict[int, int] = field(default_factory=dict)
    copies: dict[int, FakeVm] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)  # as last seen

    def place(self, name: str, copy: FakeVm) -> None:
        self.epochs[name] = 1
        self._hold(copy, 1)
        self.running.add(id(copy))

    def arrived(self, copy: FakeVm, source: FakeVm) -> None:
        """``copy`` loaded ``source``'s stream: its memory as of the switchover."""
        self._hold(copy, self.held.get(id(source)))

    def started(self, name: str, host: str, copy: FakeVm, where: str) -> str | None:
        """``copy`` runs now: why that loses writes, if it does."""
        held, latest = self.held.get(id(copy)), self.epochs.get(name, 0)
        self.epochs[name] = latest + 1
        self._hold(copy, latest + 1)
        if held is None:
            return f"{where}: {name} runs on {host} without ever receiving its memory"
        if held != latest:
            return (
                f"{where}: {name} resumed on {host} with memory of epoch {held}, but a copy "
                f"ran since (epoch {latest}): the guest's writes since are lost"
            )
        return None

    def _hold(self, copy: FakeVm, epoch: int | None) -> None:
        self.copies[id(copy)] = copy
        if epoch is not None:
            self.held[id(copy)] = epoch


def moment(world: Cluster, memory: Memory, where: str) -> list[str]:
    """What breaks the invariants of every moment now."""
    out: list[str] = []
    now_running: set[int] = set()
    for name in sorted({n for here in world.vms.values() for n in here}):
        hosts = world.running_copies(name)
        if len(hosts) > 1:
            out.append(f"{where}: {name} runs on {' and '.join(hosts)}")
        for h in hosts:
            copy = world.vms[h][name]
            now_running.add(id(copy))
            if id(copy) not in memory.running:
                lost = memory.started(name, h, copy, where)
                out += [lost] if lost else []
    memory.running = now_running
    for h in world.hosts:
        for name, v in world.vms[h].items():
            gone = [f for f in _files(v.spec) if f not in world.files[h]]
            if gone:
                out.append(f"{where}: {name} on {h} is defined on {gone}, deleted")
    return out


def final_violations(world: Cluster, db: Database) -> list[str]:
    out: list[str] = []
    with db.session() as s:
        rows = {
            v.name: (v.host.name, VmSpec.model_validate(v.spec), v.attention) for v in s.query(Vm)
        }
        records, leftovers = _records(list(s.query(Task)))
    for name, (host, spec, _) in sorted(rows.items()):
        running = world.running_copies(name)
        if running != [host]:
            out.append(f"{name}: runs on {running or 'no host'}, the inventory says {host}")
            continue
        copy = world.vms[host][name]
        if copy.spec.disks != spec.disks:
            out.append(
                f"{name} on {host}: the inventory names disks {_files(spec)}, "
                f"QEMU's definition {_files(copy.spec)}"
            )
        if copy.incoming is not None:
            out.append(f"{name} on {host}: its arrival (migration {copy.incoming.id}) unconfirmed")
    for h in world.hosts:
        for name, v in sorted(world.vms[h].items()):
            row = rows.get(name)
            if row is None:
                out.append(f"{name} on {h} ({v.runstate}): unknown to the inventory")
                continue
            if h == row[0]:
                continue
            named = (h, name) in leftovers or (row[2] is not None and h in row[2])
            if not named:
                out.append(f"{name} left defined on {h} ({v.runstate}), named by no record")
    # An agent's open record of a storage move names its files (the agent removes them when
    # the move is settled); it must come with the VM's mark, or the VM is locked unseen.
    held: set[str] = set()
    for h in world.hosts:
        for name, v in sorted(world.vms[h].items()):
            rec = v.storage_move
            if rec is None or unresolved(v) is None:
                continue
            row = rows.get(name)
            if row is None or row[2] is None:
                out.append(f"{name} on {h}: {unresolved(v)}, and the VM is not marked")
                continue
            held |= {_file(d) for d in (*rec.targets.values(), *rec.sources.values())}
    used = {f for h in world.hosts for v in world.vms[h].values() for f in _files(v.spec)}
    used |= held
    seen: set[str] = set()
    for h in world.hosts:
        for f in sorted(set(world.files[h]) - used - seen):
            seen.add(f)  # a shared datastore's file is one file, seen from every host
            if f not in records:
                out.append(f"file {f} left on {h}, used by no VM and named by no record")
    return out


def _records(tasks: list[Task]) -> tuple[str, set[tuple[str, str]]]:
    """Every task's text (error, result, machine state, events) and migrations' leftovers."""
    text, leftovers = [], set()
    for t in tasks:
        # A storage move's state keeps the files it touched (old_files, new_files) to name
        # them if it gives up: knowing a file is not naming it as left behind.
        machine = {k: v for k, v in (t.machine or {}).items() if k not in UNNAMING}
        text.append(json.dumps([t.error, t.result, machine], default=str))
        text.extend(e.message for e in t.events)
        for lo in (t.result or {}).get("leftovers") or ():
            leftovers.add((lo.get("host"), lo.get("vm")))
    return "\n".join(text), leftovers


def _files(spec: VmSpec) -> list[str]:
    return [_file(d) for d in spec.disks]


def _file(d: Disk) -> str:
    return f"{d.datastore}:{d.path}"
