"""A campaign's schedule: the cluster it starts from, its operations and the faults it injects.

A schedule is generated from a seed as the run goes (each operation is chosen on the cluster
as it is then: a VM to move, a host it is not on), and what was chosen is recorded: the
recorded schedule replays the same run (the loop is deterministic, tests.unit.campaign.simloop),
and it is what the shrinker cuts down and what a counterexample prints as.

Faults are decided per request key (host, method, path, occurrence), each from its own random
stream (seed and key): the fault at a key does not depend on what happened elsewhere.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

from tests.unit.campaign.world import CampaignWorld, Fault, Injected, Key

HOSTS = ("h1", "h2", "h3")
SHARED = "shared"
# ``wait``: nothing (the shrinker's stand-in for an operation needed only for its time).
OpKind = Literal["migrate", "move", "storage", "cancel", "drs", "enter", "exit", "wait"]
OP_WEIGHTS: dict[OpKind, int] = {
    "migrate": 30,
    "move": 15,
    "storage": 15,
    "cancel": 12,
    "drs": 10,
    "enter": 9,
    "exit": 9,
}
CANCELLABLE = ("migrate", "move", "storage", "drs", "enter")
CANCEL_RATE = 0.2  # of those: cancelled by the operator while they run
FAULT_RATE = 0.06  # of agent requests
COMPLETE_RATE = 0.1  # of the requests about a VM whose stream flows: QEMU completes it then
FAULT_WEIGHTS: dict[Fault, int] = {
    Fault.ERROR: 20,
    Fault.ERROR_AFTER: 10,
    Fault.TIMEOUT: 12,
    Fault.UNREACHABLE: 20,
    Fault.AGENT_RESTART: 15,
    Fault.COMPLETE: 25,
    Fault.MANAGER_RESTART: 5,
}


@dataclass(frozen=True)
class Placed:
    """A VM of the starting cluster: where it runs, where its disk is, its memory."""

    vm: str
    host: str
    datastore: str
    memory_mib: int = 512


@dataclass(frozen=True)
class Op:
    """One operation. ``run_for``: agent requests to let pass before the next one (0: until
    no task runs), and ``gap_s`` after that; ``cancel_at``: its task is cancelled after that
    many agent requests (if it still runs)."""

    kind: OpKind
    vm: str | None = None
    to: str | None = None
    datastore: str | None = None
    vms: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    back: bool = False  # exit: bring the evacuated VMs back
    run_for: int = 0
    gap_s: float = 0.0  # then this long (simulated) before the next: an operator's pace
    cancel_at: int | None = None  # the operator cancels its task after this many requests


@dataclass
class Schedule:
    seed: int
    placed: list[Placed]
    ops: list[Op] = field(default_factory=list)
    faults: dict[Key, Injected] = field(default_factory=dict)

    def literal(self) -> str:
        """The schedule as Python (tests.unit.campaign's names), to paste into a test."""
        lines = [f"Schedule(\n    seed={self.seed},", "    placed=["]
        lines += [f"        {p!r}," for p in self.placed]
        lines += ["    ],", "    ops=["]
        lines += [f"        {_short(op)}," for op in self.ops]
        lines += ["    ],", "    faults={"]
        lines += [f"        {k!r}: {_short(f)}," for k, f in sorted(self.faults.items())]
        lines += ["    },", ")"]
        return "\n".join(lines)

    def without(self, ops: set[int] | None = None, faults: set[Key] | None = None) -> Schedule:
        return replace(
            self,
            ops=[op for i, op in enumerate(self.ops) if i not in (ops or set())],
            faults={k: f for k, f in self.faults.items() if k not in (faults or set())},
        )


def _short(x: Op | Injected) -> str:
    """A dataclass's repr without the fields left at their defaults."""
    cls = type(x)
    fields = {
        name: getattr(x, name)
        for name in x.__dataclass_fields__
        if getattr(x, name) != cls.__dataclass_fields__[name].default
    }
    args = ", ".join(
        f"{k}=Fault.{v.name}" if isinstance(v, Fault) else f"{k}={v!r}" for k, v in fields.items()
    )
    return f"{cls.__name__}({args})"


def starting_cluster(seed: int, vms: int = 5) -> list[Placed]:
    """Where the VMs start: spread at random, disks on the shared datastore or local."""
    rng = random.Random(f"{seed}:placement")
    out = []
    for i in range(1, vms + 1):
        host = rng.choice(HOSTS)
        datastore = SHARED if rng.random() < 0.6 else f"local-{host}"
        out.append(Placed(f"vm{i}", host, datastore, rng.choice((256, 512, 1024))))
    return out


@dataclass(frozen=True)
class View:
    """What the generator sees of the cluster when it picks the next operation."""

    where: dict[str, str]  # VM -> the host the inventory names
    disks: dict[str, tuple[str, ...]]  # VM -> its disks' datastores
    busy: dict[str, int]  # VM -> its active task
    operations: tuple[str, ...]  # active operations' kinds (drs-apply, maintenance, ...)
    maintenance: tuple[str, ...]  # hosts in or entering maintenance


class Generator:
    """Draws the operations and faults of seed ``seed``."""

    def __init__(self, seed: int, fault_rate: float = FAULT_RATE) -> None:
        self.seed, self.fault_rate = seed, fault_rate
        self.rng = random.Random(f"{seed}:ops")

    def op(self, view: View) -> Op:
        rng = self.rng
        while True:
            kind = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
            op = self._op(kind, view)
            if op is not None:
                run_for = 0 if rng.random() < 0.3 else rng.randint(1, 40)
                op = replace(op, run_for=run_for, gap_s=round(rng.uniform(0, 20), 1))
                if kind in CANCELLABLE and rng.random() < CANCEL_RATE:
                    op = replace(op, cancel_at=rng.randint(1, 30))
                return op

    def _op(self, kind: OpKind, view: View) -> Op | None:
        rng = self.rng
        vm = rng.choice(sorted(view.where))
        here = view.where[vm]
        to = rng.choice([h for h in HOSTS if h != here])
        local = any(d != SHARED for d in view.disks[vm])
        if kind == "migrate" and (not local or rng.random() < 0.1):
            return Op("migrate", vm=vm, to=to)  # local disks: refused (not reachable there)
        if kind in ("migrate", "move"):
            target = f"local-{to}" if rng.random() < 0.8 else SHARED
            return Op("move", vm=vm, to=to, datastore=target)
        if kind == "storage":
            options = [d for d in (SHARED, f"local-{here}") if d not in view.disks[vm]]
            return Op("storage", vm=vm, datastore=rng.choice(options or [SHARED]))
        if kind == "cancel":
            targets = sorted(view.busy) + sorted(set(view.operations))
            return Op("cancel", vm=rng.choice(targets)) if targets else None
        if kind == "drs":
            vms = tuple(sorted(rng.sample(sorted(view.where), rng.randint(1, 2))))
            return Op("drs", vms=vms, hosts=tuple(sorted(rng.sample(HOSTS, rng.randint(1, 2)))))
        if kind == "enter":
            if view.maintenance:
                return None  # one host at a time: the others take its VMs
            return Op("enter", hosts=(rng.choice(HOSTS),))
        if not view.maintenance:
            return None
        return Op("exit", hosts=(rng.choice(view.maintenance),), back=rng.random() < 0.5)

    def fault(self, key: Key, world: CampaignWorld) -> Injected | None:
        rng = random.Random(f"{self.seed}:{key}")
        mine = _request_vm(key)
        if mine in _migrating(world) and rng.random() < COMPLETE_RATE:
            return Injected(Fault.COMPLETE, vm=mine)  # the race that matters most
        if rng.random() >= self.fault_rate:
            return None
        fault = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
        if fault == Fault.UNREACHABLE:
            # Mostly a blip; now and then long enough to exhaust every retry.
            seconds = _pick(rng, [(0.6, 0.1, 5.0), (0.3, 5.0, 60.0), (0.1, 60.0, 300.0)])
            return Injected(fault, seconds=seconds)
        if fault == Fault.AGENT_RESTART:
            seconds = _pick(rng, [(0.4, 0.0, 0.0), (0.4, 0.5, 10.0), (0.2, 10.0, 120.0)])
            return Injected(fault, done=rng.random() < 0.5, seconds=seconds)
        if fault == Fault.MANAGER_RESTART:
            return Injected(fault, done=rng.random() < 0.5)
        if fault == Fault.COMPLETE:
            vm = _completable(key, world, rng)
            return Injected(fault, vm=vm) if vm is not None else None
        return Injected(fault)


def _pick(rng: random.Random, ranges: list[tuple[float, float, float]]) -> float:
    """A duration: one of the (weight, low, high) ranges, then uniform in it."""
    _weight, low, high = rng.choices(ranges, weights=[r[0] for r in ranges])[0]
    return round(rng.uniform(low, high), 2)


def _migrating(world: CampaignWorld) -> list[str]:
    """VMs whose source QEMU is sending a stream that may complete now."""
    return sorted(
        name
        for here in world.vms.values()
        for name, v in here.items()
        if v.migration == "active" and v.outgoing is not None
    )


def _request_vm(key: Key) -> str | None:
    parts = key[2].split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "vms" else None


def _completable(key: Key, world: CampaignWorld, rng: random.Random) -> str | None:
    """The VM whose QEMU completes: the request's own, if it is migrating, else another."""
    migrating = _migrating(world)
    mine = _request_vm(key)
    if mine in migrating:
        return mine
    return rng.choice(migrating) if migrating else None


def mix(counter: Counter[str]) -> str:
    total = sum(counter.values()) or 1
    return ", ".join(f"{k} {v} ({100 * v / total:.0f} %)" for k, v in counter.most_common())
