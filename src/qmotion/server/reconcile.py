"""Reconcile (pure): what the hosts' agents hold of each VM against the inventory, as actions.

The rules (issue 22's contract, section 4). Each VM's copies are sorted by what their QEMU can
still do:

- running: the guest runs there;
- stale: QEMU in ``postmigrate`` after an outgoing migration that completed (its id known):
  the guest left, and the agent never resumes this copy for another migration;
- waiting: a destination started paused (``incoming_migration`` set) that never ran;
- dormant: no QEMU (stopped, suspended): a definition, nothing runs;
- uncertain: any other live QEMU (paused for another reason, in postmigrate without a completed
  outgoing migration such as a postcopy source, crashed, wedged).

What is certain is fixed: the inventory follows the one running copy when its recorded host
answered and holds no copy or only a stale one (``Move``; a stopped, suspended or waiting copy
there is another definition of the VM: an operator decides) and names the disks the running
copy's definition names there (a ``Move`` to the same host); a running copy
still marked as a migration's arrival is confirmed there (``Confirm``); stale copies are
released and unconfirmed destinations that do not run discarded, only while exactly one copy
runs and only with their own migration's id (``Release``, ``Discard``: the agent refuses
anything else), and never a destination the running copy still sends its stream to (QEMU may
complete it between the census and the discard: that destination would then hold the newest
memory); a paused destination whose twin on the recorded host completed the same
migration gets the word (``Finish``).
Everything else that two copies could disagree on is raised as ``Attention`` with the reason;
the mark is cleared (``Clear``) only once every host answered (a host marked down counts as
silent: it may still run a copy) and the VM runs exactly once, where the inventory says, with
no other copy left but the ones this round removes. A VM that runs nowhere keeps its mark
until an operator resolves it (``vm resolve``): nothing here proves where its newest writes
are; so does a storage move its agent never settled (``storage.UNSETTLED``): no census shows
the agent's record of it, and ``vm resolve`` settles it.
VMs with a task under way are skipped: the task owns them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from qmotion.api.vm import VmInfo, VmSpec, VmState
from qmotion.migration.storage import UNSETTLED

# QEMU run states of a destination that has not run yet (started with -S, or still loading).
WAITING_STATUSES = ("inmigrate", "paused", "prelaunch")
# A running copy's outgoing status with no stream under way (None: no outgoing record).
SETTLED_OUTGOING = (None, "none", "failed", "cancelled", "completed")


class Kind(StrEnum):
    RUNNING = "running"
    STALE = "stale"
    WAITING = "waiting"
    DORMANT = "dormant"
    UNCERTAIN = "uncertain"


def kind_of(info: VmInfo) -> Kind:
    if info.state == VmState.RUNNING:
        return Kind.RUNNING
    if (
        info.qemu_status == "postmigrate"
        and info.outgoing_status == "completed"
        and info.outgoing_migration is not None
    ):
        return Kind.STALE
    if (
        info.incoming_migration is not None
        and info.state == VmState.PAUSED
        and info.qemu_status in WAITING_STATUSES
    ):
        return Kind.WAITING
    if info.state in (VmState.STOPPED, VmState.SUSPENDED):
        return Kind.DORMANT
    return Kind.UNCERTAIN


@dataclass(frozen=True)
class Recorded:
    """A VM as the inventory has it; ``disks``: its disks' files (None: not compared)."""

    name: str
    host: str
    attention: str | None = None
    disks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Move:
    """The inventory follows the one running copy: its host, and its definition there."""

    vm: str
    source: str  # the host the inventory names now (the move applies only if it still does)
    to: str
    spec: VmSpec


@dataclass(frozen=True)
class Finish:
    """The word to a paused destination whose source completed ``migration``."""

    vm: str
    host: str
    migration: str


@dataclass(frozen=True)
class Confirm:
    """The VM runs here, arrived by ``migration``: its arrival is confirmed (keep-disks)."""

    vm: str
    host: str
    migration: str


@dataclass(frozen=True)
class Release:
    """A stale copy (its guest left by ``migration``) ends, its twin seen running."""

    vm: str
    host: str
    migration: str


@dataclass(frozen=True)
class Discard:
    """A destination of ``migration`` that never ran is removed, another copy running."""

    vm: str
    host: str
    migration: str


@dataclass(frozen=True)
class Attention:
    vm: str
    reason: str


@dataclass(frozen=True)
class Clear:
    vm: str


@dataclass(frozen=True)
class Unknown:
    """A VM an agent holds that the inventory does not know: logged, never touched."""

    vm: str
    hosts: tuple[str, ...]


Action = Move | Finish | Confirm | Release | Discard | Attention | Clear | Unknown


def decide(
    rows: Sequence[Recorded],
    census: Mapping[str, Sequence[VmInfo] | None],
    busy: Collection[str],
) -> list[Action]:
    """The actions of one round. ``census``: every host that is not down, with the VMs its
    agent listed (None: it did not answer); ``busy``: VMs with a task under way (or one that
    ended or started during the census). Per VM, in the order to perform them: fixes first
    (a finish, then the move, then confirm, release and discard), the mark last."""
    silent = frozenset(h for h, infos in census.items() if infos is None)
    copies: dict[str, dict[str, VmInfo]] = {}
    for host in sorted(census):
        for info in census[host] or ():
            copies.setdefault(info.name, {})[host] = info
    out: list[Action] = []
    known = {r.name for r in rows}
    for row in sorted(rows, key=lambda r: r.name):
        if row.name not in busy:
            out.extend(decide_vm(row, copies.get(row.name, {}), silent))
    for name in sorted(set(copies) - known - set(busy)):
        out.append(Unknown(name, tuple(sorted(copies[name]))))
    return out


def decide_vm(row: Recorded, copies: Mapping[str, VmInfo], silent: Collection[str]) -> list[Action]:
    """One VM: ``copies`` are the hosts that answered and hold it; ``silent`` the hosts that
    did not answer."""
    kinds = {h: kind_of(i) for h, i in copies.items()}
    running = sorted(h for h, k in kinds.items() if k == Kind.RUNNING)
    if len(running) >= 2:
        others = _others(copies, exclude=running)
        return _mark(row, f"runs on {' and '.join(running)}{others}: two copies")
    if running:
        return _one_running(row, copies, kinds, silent, running[0])
    return _none_running(row, copies, kinds, silent)


def _one_running(
    row: Recorded,
    copies: Mapping[str, VmInfo],
    kinds: Mapping[str, Kind],
    silent: Collection[str],
    here: str,
) -> list[Action]:
    out: list[Action] = []
    problems: list[str] = []
    if here == row.host and row.disks is not None and row.disks != disk_files(copies[here].spec):
        # A storage move's pivot whose new disks the inventory never heard of (the agent
        # was away at its end): the agent's definition names what QEMU runs on.
        out.append(Move(row.name, row.host, here, copies[here].spec))
    if here != row.host:
        theirs = kinds.get(row.host)
        if row.host in silent:
            problems.append(f"runs on {here}; its recorded host {row.host} does not answer")
        elif theirs is None or theirs == Kind.STALE:
            out.append(Move(row.name, row.host, here, copies[here].spec))
        else:
            problems.append(
                f"runs on {here}; its recorded host {row.host} holds it {_state(copies[row.host])}"
            )
    info = copies[here]
    if info.incoming_migration is not None and not problems:
        out.append(Confirm(row.name, here, info.incoming_migration))
    for host in sorted(copies):
        other, kind = copies[host], kinds[host]
        if host == here:
            continue
        if kind == Kind.STALE and other.outgoing_migration is not None:
            out.append(Release(row.name, host, other.outgoing_migration))
        elif kind in (Kind.WAITING, Kind.DORMANT) and other.incoming_migration is not None:
            m = other.incoming_migration
            if info.outgoing_migration == m and info.outgoing_status not in SETTLED_OUTGOING:
                # Its stream still flows (no task follows it): QEMU may complete it any moment,
                # and then this destination holds the newest memory. Neither is touched until
                # the stream ends: then it runs there (Finish) or goes (Discard).
                problems.append(f"runs on {here} and still sends migration {m} to {host}")
                continue
            # A destination that never ran (or whose QEMU is gone), the VM running elsewhere.
            out.append(Discard(row.name, host, m))
        elif kind == Kind.UNCERTAIN and host != row.host:
            problems.append(f"runs on {here}; {host} holds a copy {_state(other)}")
        elif host != row.host:
            # A stopped, suspended or waiting copy no migration of this round's knowledge
            # explains: another definition of the VM, which an operator must remove.
            problems.append(f"runs on {here}; {host} holds another copy {_state(other)}")
    return out + _marks(row, problems, silent, clears=True)


def _none_running(
    row: Recorded,
    copies: Mapping[str, VmInfo],
    kinds: Mapping[str, Kind],
    silent: Collection[str],
) -> list[Action]:
    source = copies.get(row.host)
    if source is not None and kinds[row.host] == Kind.STALE:
        m = source.outgoing_migration
        waiting = [
            h
            for h, k in kinds.items()
            if k == Kind.WAITING and h != row.host and copies[h].incoming_migration == m
        ]
        if m is not None and len(waiting) == 1:
            return [Finish(row.name, waiting[0], m)]
    problems = []
    for host in sorted(copies):
        kind, info = kinds[host], copies[host]
        if kind == Kind.STALE:
            problems.append(
                f"paused in postmigrate on {host} after migration {info.outgoing_migration}, "
                "and no copy runs"
            )
        elif kind == Kind.WAITING:
            problems.append(
                f"a destination of migration {info.incoming_migration} waits on {host} "
                f"({info.qemu_status}) with no source to finish it, and no copy runs"
            )
        elif kind == Kind.UNCERTAIN and host != row.host:
            problems.append(f"not running; {host} holds a copy {_state(info)}")
    if problems and silent:
        problems.append(f"{', '.join(sorted(silent))} did not answer")
    # No copy runs: a mark stays (nothing here proves where the newest writes are).
    return _marks(row, problems, silent, clears=False)


def _marks(
    row: Recorded, problems: list[str], silent: Collection[str], *, clears: bool
) -> list[Action]:
    if problems:
        return _mark(row, "; ".join(problems))
    # Only a full census clears, and only where the VM runs once (``clears``): a host that
    # did not answer may hold another copy.
    settled_elsewhere = row.attention is not None and row.attention.startswith(UNSETTLED)
    if clears and row.attention is not None and not silent and not settled_elsewhere:
        return [Clear(row.name)]
    return []


def _mark(row: Recorded, reason: str) -> list[Action]:
    return [] if row.attention == reason else [Attention(row.name, reason)]


def disk_files(spec: VmSpec) -> tuple[str, ...]:
    """A definition's disks as ``DATASTORE:PATH``."""
    return tuple(f"{d.datastore}:{d.path}" for d in spec.disks)


def _state(info: VmInfo) -> str:
    """A copy as the reason names it: its state, QEMU's and the migrations it is in."""
    parts = [str(info.state)]
    if info.qemu_status and info.qemu_status != info.state:
        parts.append(f"QEMU {info.qemu_status}")
    if info.outgoing_migration:
        parts.append(f"outgoing {info.outgoing_migration} {info.outgoing_status or 'unknown'}")
    if info.incoming_migration:
        parts.append(f"incoming {info.incoming_migration}")
    return "(" + ", ".join(parts) + ")"


def _others(copies: Mapping[str, VmInfo], exclude: Collection[str]) -> str:
    rest = [f"{h} {_state(copies[h])}" for h in sorted(copies) if h not in exclude]
    return f" (also on {', '.join(rest)})" if rest else ""
