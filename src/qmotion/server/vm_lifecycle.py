"""A recorded VM's life on its host: start, stop, suspend, delete, its attention mark and an
operator's resolution of a VM found in more than one place.

Mixed into ``Inventory`` (one object: the cluster's record of hosts and VMs; this is the half
that acts on one VM through its host's agent). Every action that could bring a second copy to
life is refused while the VM needs attention or while another host holds a copy of it: a
stale copy paused after a migration, stopped and started again, would boot from the disks the
VM that runs elsewhere is writing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qmotion.api.errors import AgentErrorCode
from qmotion.api.server import VmOut
from qmotion.api.vm import VmInfo, VmSpec, VmState
from qmotion.client.agent import AgentClient
from qmotion.server.db import Database, Host, Vm
from qmotion.server.errors import Conflict, Invalid, NotFound, Upstream

log = logging.getLogger(__name__)
T = TypeVar("T")
LIST_TIMEOUT_S = 10.0
# Longer than the agent's own limit on saving or restoring a VM's memory (600 s): an answer
# missed here would leave the inventory's spec behind the agent's.
LIFECYCLE_TIMEOUT_S = 900.0


class VmLifecycle:
    """Mixed into the Inventory: what it provides is declared here."""

    db: Database

    def call(
        self,
        host: Host,
        fn: Callable[[AgentClient], T],
        vm: str | None = None,
        timeout_s: float = 120.0,
    ) -> T:
        raise NotImplementedError

    def vm_by_name(self, s: Session, name: str) -> Vm:
        raise NotImplementedError

    def host_by_name(self, s: Session, name: str, field: str = "host") -> Host:
        raise NotImplementedError

    def vm_out(self, s: Session, vm: Vm) -> VmOut:
        raise NotImplementedError

    # ------------------------------------------------------------------ attention

    def set_attention(self, vm: str, reason: str | None) -> None:
        """Mark why ``vm`` needs an operator (None: it no longer does). Migrations, DRS,
        start, suspend and delete --force leave a marked VM alone; reconcile clears the mark
        once the VM runs exactly once, where the inventory says. A VM no longer in the
        inventory: nothing."""
        if reason is not None:
            log.warning("VM %s needs attention: %s", vm, reason)
        with self.db.session() as s:
            s.execute(
                update(Vm)
                .where(Vm.name == vm)
                .values(attention=reason)
                .execution_options(synchronize_session=False)
            )

    def resolve_vm(self, name: str, keep: str | None = None) -> VmOut:
        """An operator's word on a VM that needs attention. Without ``keep``: no host but its
        recorded one holds a copy (checked), so the mark goes. With ``keep``: the copy on that
        host is the VM (the inventory takes its host, definition and state); every other
        host's copy is removed (its QEMU ended, its definition deleted; disk files are left:
        they may be the kept copy's too). A copy that is not running is never kept while
        another runs: that one may hold writes the kept one lacks. Either way a storage move
        the manager gave up on is settled on the kept host first (its old files released
        after a pivot, the mirror aborted before one), so the agent lets the VM move again."""
        with self.db.session() as s:
            vm = self.vm_by_name(s, name)
            if self.db.active_task_for_vm(s, name) is not None:
                raise Conflict(f"VM {name} is migrating", vm=name)
            if keep is None:
                self._nowhere_else(s, vm)
                self._settle_storage_move(vm.host, name)
                info = self._info(vm.host, name)
                if info is not None:
                    vm.spec = info.spec.model_dump(mode="json")
                vm.attention = None
                return self.vm_out(s, vm)
            target = self.host_by_name(s, keep, field="keep")
            copies = self._copies(s, name)
            kept = copies.get(keep)
            if kept is None:
                raise Invalid(f"host {keep} holds no copy of VM {name}", field="keep", vm=name)
            running = sorted(h for h, i in copies.items() if i.state == VmState.RUNNING)
            if kept.state != VmState.RUNNING and running:
                raise Conflict(
                    f"the copy on {keep} is {kept.qemu_status or kept.state} while the copy on "
                    f"{', '.join(running)} runs: that one may hold writes the kept one lacks "
                    f"(keep {running[0]})",
                    field="keep",
                    vm=name,
                    host=running[0],
                )
            # Settled first: if the kept copy's move cannot be settled, nothing was removed.
            self._settle_storage_move(target, name)
            for host in s.scalars(select(Host).where(Host.name.in_(set(copies) - {keep}))):
                log.warning(
                    "VM %s: the copy on %s removed (the operator keeps %s)", name, host.name, keep
                )
                self.call(host, lambda c: c.delete(name, force=True), vm=name)
            kept = self._info(target, name) or kept
            vm.host = target
            vm.state = kept.state
            vm.spec = kept.spec.model_dump(mode="json")
            vm.memory_mib = VmSpec.model_validate(vm.spec).memory
            vm.attention = None
            return self.vm_out(s, vm)

    def _info(self, host: Host, name: str) -> VmInfo | None:
        infos = self.call(host, lambda c: c.list_vms(), vm=name, timeout_s=LIST_TIMEOUT_S)
        return next((i for i in infos if i.name == name), None)

    def _settle_storage_move(self, host: Host, name: str) -> None:
        """End a storage move left unsettled on ``host`` (the agent refuses to migrate, start
        or delete the VM while one is): release after a pivot, abort before one."""
        try:
            status = self.call(host, lambda c: c.storage_move_status(name), vm=name)
        except (Conflict, NotFound):
            return  # no move recorded there, or no such VM
        if status.phase in ("released", "aborted"):
            return
        step = "release" if status.phase in ("pivoted", "completed") else "abort"
        try:
            done = self.call(host, lambda c: c.storage_move_step(name, step), vm=name)
        except Conflict as exc:
            if exc.code != AgentErrorCode.ALREADY_SWITCHED:
                raise
            done = self.call(host, lambda c: c.storage_move_step(name, "release"), vm=name)
        log.warning("VM %s: its storage move on %s settled (%s)", name, host.name, done.phase)

    # ------------------------------------------------------------------ lifecycle

    def _lifecycle(
        self, name: str, fn: Callable[[AgentClient], VmInfo], state: str, *, revives: bool
    ) -> VmOut:
        """``revives``: the action may bring a copy to life (start, a suspend's later
        resume): refused while the VM needs attention or another host holds a copy."""
        with self.db.session() as s:
            vm = self.vm_by_name(s, name)
            if self.db.active_task_for_vm(s, name) is not None:
                raise Conflict(f"VM {name} is migrating", vm=name)
            if revives:
                self._not_marked(vm, "started or suspended")
                self._nowhere_else(s, vm)
            info = self.call(vm.host, fn, vm=name, timeout_s=LIFECYCLE_TIMEOUT_S)
            vm.state = state
            # The agent's definition changes on suspend and resume (the saved state).
            vm.spec = info.spec.model_dump(mode="json")
            return self.vm_out(s, vm)

    def start_vm(self, name: str) -> VmOut:
        """Start a VM; a suspended one resumes where it was. A cold migration's hold left
        behind by a task that ended (none is active: checked first) is released."""

        def start(c: AgentClient) -> VmInfo:
            c.unexport_disks(name)
            return c.start(name)

        return self._lifecycle(name, start, "running", revives=True)

    def stop_vm(self, name: str, force: bool = False) -> VmOut:
        # Allowed with a mark: stopping a copy never makes two of them run.
        return self._lifecycle(name, lambda c: c.stop(name, force=force), "stopped", revives=False)

    def suspend_vm(self, name: str) -> VmOut:
        return self._lifecycle(name, lambda c: c.suspend(name), "suspended", revives=True)

    def delete_vm(self, name: str, force: bool = False) -> None:
        """Delete a VM on its host and forget it. Never while another host (not down)
        reports it in any state (a copy that runs there, or a migration's other half), nor
        with ``force`` while it needs attention: forgetting it would hand its address to the
        next VM while a copy still answers on it."""
        with self.db.session() as s:
            vm = self.vm_by_name(s, name)
            if self.db.active_task_for_vm(s, name) is not None:
                raise Conflict(f"VM {name} is migrating", vm=name)
            if force:
                self._not_marked(vm, "deleted with --force")
            self._nowhere_else(s, vm)
            try:
                self.call(vm.host, lambda c: c.delete(name, force=force), vm=name)
            except NotFound as exc:
                # Its host no longer has it (removed there by hand): --force forgets the
                # record, as Nova's local delete does; without it, say so.
                if not force or exc.code != AgentErrorCode.VM_NOT_FOUND:
                    raise
            s.delete(vm)

    @staticmethod
    def _not_marked(vm: Vm, what: str) -> None:
        if vm.attention is not None:
            raise Conflict(
                f"VM {vm.name} needs attention ({vm.attention}): not {what} until that is "
                f"resolved (qmotion vm resolve {vm.name})",
                code="vm_attention",
                vm=vm.name,
            )

    def _copies(self, s: Session, name: str) -> dict[str, VmInfo]:
        """Every copy of ``name`` the hosts hold (``_census``)."""
        out: dict[str, VmInfo] = {}
        for host, infos in self._census(s, name):
            found = next((i for i in infos if i.name == name), None)
            if found is not None:
                out[host.name] = found
        return out

    def _census(self, s: Session, name: str) -> list[tuple[Host, list[VmInfo]]]:
        """What each host holds. One that does not answer refuses (a copy there cannot be
        ruled out), unless it is marked down: then it is asked, and counts if it answers (a
        QEMU outlives its agent), but it does not hold everything up while it is away (no
        route removes a host yet: one dead for good would block every VM)."""
        out = []
        for host in s.scalars(select(Host)):
            try:
                infos = self.call(host, lambda c: c.list_vms(), vm=name, timeout_s=LIST_TIMEOUT_S)
            except Upstream:
                if host.state == "down":
                    log.warning("VM %s: host %s is down and does not answer", name, host.name)
                    continue
                raise
            out.append((host, infos))
        return out

    def _nowhere_else(self, s: Session, vm: Vm) -> None:
        """No host but its own reports the VM, in any state (``_census``)."""
        for host, infos in self._census(s, vm.name):
            if host.id == vm.host_id:
                continue
            found = next((i for i in infos if i.name == vm.name), None)
            if found is not None:
                raise Conflict(
                    f"VM {vm.name} is also on {host.name} ({found.qemu_status or found.state}), "
                    f"not only on {vm.host.name}: see where it runs and keep one copy "
                    f"(qmotion vm resolve {vm.name} --keep HOST)",
                    vm=vm.name,
                    host=host.name,
                )
