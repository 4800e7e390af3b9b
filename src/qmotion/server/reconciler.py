"""Reconcile on the live cluster: each host's VMs listed, the pure rules' actions performed.

One round (after every host refresh): the agents of every host that is not down list their
VMs, the inventory and the VMs with a task are read, ``reconcile.decide`` says what to do, and
this module does it, each action re-checked against the database right before it is done (a
task that started meanwhile owns the VM; a VM whose recorded host changed is left for the next
round). The agent calls carry the migration's id, so an agent refuses one that no longer
applies (a stale copy that is not that migration's source, a destination that is not its).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from qmotion.api.vm import VmInfo, VmSpec, VmState
from qmotion.server.db import ACTIVE_TASK_STATES, Host, Task, Vm, utcnow
from qmotion.server.errors import ManagerError
from qmotion.server.inventory import Inventory
from qmotion.server.reconcile import (
    Action,
    Attention,
    Clear,
    Confirm,
    Discard,
    Finish,
    Move,
    Recorded,
    Release,
    Unknown,
    decide,
    disk_files,
)

log = logging.getLogger(__name__)
LIST_TIMEOUT_S = 10.0
FINISH_WAIT_MS = 5000  # a destination still loading the stream gets this long to run


class Moved(Exception):
    """The VM's record changed since the round read it: its other actions wait a round."""


class Reconciler:
    """Reconcile rounds over ``inventory``'s hosts; one round at a time."""

    def __init__(self, inventory: Inventory, finish_wait_ms: int = FINISH_WAIT_MS) -> None:
        self.inventory, self.db = inventory, inventory.db
        self.finish_wait_ms = finish_wait_ms
        self._lock = threading.Lock()

    def run(self) -> list[Action]:
        """One round; what it did (a round already under way: nothing, at once)."""
        if not self._lock.acquire(blocking=False):
            return []
        try:
            return self._round()
        finally:
            self._lock.release()

    def _round(self) -> list[Action]:
        since = utcnow()
        with self.db.session() as s:
            hosts = list(s.scalars(select(Host).order_by(Host.name)))
        # A host marked down is silent, not empty: it may still run a copy nobody can see.
        census = {h.name: None if h.state == "down" else self._listing(h) for h in hosts}
        with self.db.session() as s:
            rows = [
                Recorded(
                    v.name, v.host.name, v.attention, disk_files(VmSpec.model_validate(v.spec))
                )
                for v in s.scalars(select(Vm).order_by(Vm.name))
            ]
            busy = _busy(s, since)
        by_vm: dict[str, list[Action]] = {}
        done: list[Action] = []
        for action in decide(rows, census, busy):
            if isinstance(action, Unknown):
                log.info("host(s) %s hold VM %s, unknown to the inventory", action.hosts, action.vm)
                done.append(action)
            else:
                by_vm.setdefault(action.vm, []).append(action)
        recorded = {r.name: r for r in rows}
        for vm, actions in by_vm.items():
            done.extend(self._settle(recorded[vm], actions, census, since))
        return done

    def _listing(self, host: Host) -> list[VmInfo] | None:
        try:
            return self.inventory.call(host, lambda c: c.list_vms(), timeout_s=LIST_TIMEOUT_S)
        except ManagerError as exc:
            log.warning("reconcile: host %s did not list its VMs: %s", host.name, exc)
            return None

    def _settle(
        self,
        row: Recorded,
        actions: Sequence[Action],
        census: Mapping[str, Sequence[VmInfo] | None],
        since: datetime,
    ) -> list[Action]:
        """One VM's actions in order: fixes, then its mark (cleared only if every fix held).
        A destination that runs after the word is decided on again, with what it answered."""
        done: list[Action] = []
        failed = False
        for action in actions:
            try:
                if isinstance(action, Finish):
                    info = self._finish(action, since)
                    if info is None or info.state != VmState.RUNNING:
                        failed = True
                        continue
                    done.append(action)
                    now = _replaced(census, action.host, info)
                    done.extend(self._settle(row, _after_finish(row, now), now, since))
                    return done
                if isinstance(action, Clear) and failed:
                    continue
                self._perform(action, since)
                done.append(action)
            except Moved as exc:
                log.info("reconcile: VM %s left for the next round: %s", row.name, exc)
                return done
            except Exception as exc:  # one VM's failure (an agent, the database) is its own
                log.warning("reconcile: VM %s: %s failed: %s", row.name, _what(action), exc)
                # What follows a failed fix was decided assuming it held (a release after a
                # confirm, the mark's clearing): the VM waits for the next round.
                return done
        return done

    def _perform(self, action: Action, since: datetime) -> None:
        if isinstance(action, Move):
            self._move(action, since)
            return
        if isinstance(action, Attention | Clear):
            reason = action.reason if isinstance(action, Attention) else None
            with self.db.session() as s:
                _check_idle(s, action.vm, since)
            self.inventory.set_attention(action.vm, reason)
            if reason is None:
                log.warning("reconcile: VM %s needs no attention any more", action.vm)
            return
        assert isinstance(action, Confirm | Release | Discard)
        vm, m = action.vm, action.migration
        with self.db.session() as s:
            _check_idle(s, vm, since)
            host = self.inventory.host_by_name(s, action.host)
        log.warning("reconcile: VM %s: %s", vm, _what(action))
        if isinstance(action, Confirm):
            self.inventory.call(host, lambda c: c.keep_disks(vm, migration=m), vm=vm)
        elif isinstance(action, Release):
            self.inventory.call(host, lambda c: c.release(vm, migration=m), vm=vm)
        else:
            # force: a destination's QEMU is alive (paused, never ran); the agent refuses by
            # the id anything that ran or is not that migration's.
            self.inventory.call(host, lambda c: c.delete(vm, force=True, migration=m), vm=vm)

    def _finish(self, action: Finish, since: datetime) -> VmInfo | None:
        vm, m, wait = action.vm, action.migration, self.finish_wait_ms
        with self.db.session() as s:
            _check_idle(s, vm, since)
            host = self.inventory.host_by_name(s, action.host)
        log.warning("reconcile: VM %s: %s", vm, _what(action))
        info = self.inventory.call(
            host,
            lambda c: c.finish_migration(vm, m, wait_ms=wait),
            vm=vm,
            timeout_s=wait / 1000 + 30.0,
        )
        if info.state != VmState.RUNNING:
            log.warning("reconcile: VM %s does not run on %s yet (%s)", vm, host.name, info.state)
            return None
        return info

    def _move(self, action: Move, since: datetime) -> None:
        with self.db.session() as s:
            _check_idle(s, action.vm, since)
            row = self.inventory.vm_by_name(s, action.vm)
            if row.host.name != action.source:
                raise Moved(f"its record names {row.host.name} now, not {action.source}")
            row.host = self.inventory.host_by_name(s, action.to)
            row.state = VmState.RUNNING
            row.spec = action.spec.model_dump(mode="json")
            row.memory_mib = action.spec.memory
        log.warning("reconcile: VM %s: %s", action.vm, _what(action))


def _busy(s: Session, since: datetime, vm: str | None = None) -> set[str]:
    """VMs (or only ``vm``) a task holds now, or held at any moment since ``since`` (what
    the census saw of them may be a task's passing state)."""
    q = select(Task.vm).where(
        Task.vm.is_not(None) if vm is None else Task.vm == vm,
        or_(
            Task.state.in_(ACTIVE_TASK_STATES),
            Task.created_at >= since,
            Task.ended_at >= since,
        ),
    )
    return {vm for vm in s.scalars(q) if vm is not None}


def _check_idle(s: Session, vm: str, since: datetime) -> None:
    """Right before an action: no task took the VM since the round began."""
    if vm in _busy(s, since, vm):
        raise Moved("a task took it meanwhile")


def _replaced(
    census: Mapping[str, Sequence[VmInfo] | None], host: str, info: VmInfo
) -> dict[str, Sequence[VmInfo] | None]:
    """The census with ``host``'s copy of the VM replaced by ``info``."""
    out = dict(census)
    out[host] = [i for i in census.get(host) or () if i.name != info.name] + [info]
    return out


def _after_finish(row: Recorded, census: Mapping[str, Sequence[VmInfo] | None]) -> list[Action]:
    """What follows the word, from the census with the destination's answer."""
    return [a for a in decide([row], census, ()) if not isinstance(a, Finish | Unknown)]


def _what(action: Action) -> str:
    if isinstance(action, Move) and action.source == action.to:
        return f"inventory names the disks of the copy on {action.to}: {disk_files(action.spec)}"
    if isinstance(action, Move):
        return f"inventory moved {action.source} -> {action.to} (the one running copy)"
    if isinstance(action, Finish):
        return f"the word to the paused destination on {action.host} (migration {action.migration})"
    if isinstance(action, Confirm):
        return f"arrival on {action.host} confirmed (migration {action.migration})"
    if isinstance(action, Release):
        return f"stale copy on {action.host} released (migration {action.migration})"
    if isinstance(action, Discard):
        return f"waiting destination on {action.host} removed (migration {action.migration})"
    if isinstance(action, Attention):
        return f"attention: {action.reason}"
    return "attention cleared"
