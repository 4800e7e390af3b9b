"""Tasks that move a VM's disks: Storage vMotion (a running VM's disks to another datastore)
and cold migration (a stopped or suspended VM to another host), run by the TaskRunner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.api.sizes import parse_rate_bytes
from qmotion.api.storage import DiskFormat, MirrorRequest, MirrorStatus
from qmotion.api.vm import VmSpec, VmState
from qmotion.migration import cold, storage
from qmotion.migration.prechecks import (
    HostView,
    PrecheckInput,
    Refusal,
    attention_refusals,
    precheck,
)
from qmotion.migration.storage import StoragePortError
from qmotion.migration.vocabulary import Phase
from qmotion.server.db import Database, Host, Task, TaskEvent, Vm
from qmotion.server.errors import Conflict, Invalid, LeaseLost, raise_refusals
from qmotion.server.inventory import Inventory
from qmotion.server.replicas import Membership
from qmotion.server.tasks.cold import AgentColdPort, cold_refusals
from qmotion.server.tasks.ends import host_copy
from qmotion.server.tasks.port import vm_view
from qmotion.server.tasks.slots import Priority, Slots
from qmotion.server.tasks.storage import AgentStoragePort, storage_prechecks
from qmotion.server.tasks.task_view import COLD_MIGRATE, STORAGE_MOVE, task_out

log = logging.getLogger(__name__)


class DiskTasks:
    """Mixed into the TaskRunner: what it provides is declared here."""

    db: Database
    inventory: Inventory
    per_host: int
    _slots: dict[str, Slots]
    _cancel: dict[int, asyncio.Event]
    _running: dict[int, asyncio.Task[None]]

    async def _take(
        self,
        held: contextlib.AsyncExitStack,
        hosts: Iterable[str],
        priority: Priority,
        stop: asyncio.Event | None,
    ) -> bool:
        """Every host's slot, in the one order of host names (no two moves wait for each
        other's); released with ``held``. False once ``stop`` is set while waiting: the move
        was cancelled while queued."""
        for host in sorted(set(hosts)):
            slots = self._slots.setdefault(host, Slots(self.per_host))
            if not await slots.acquire_unless(priority, stop):
                return False
            held.callback(slots.release)
        return True

    membership: Membership

    async def _begin(self, task_id: int, hosts: Sequence[str], cancel: asyncio.Event) -> bool:
        raise NotImplementedError

    def owned_task(self, s: Session, task_id: int) -> Task:
        raise NotImplementedError

    def _launch(self, task_id: int, work: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def _forget(self, task_id: int) -> None:
        raise NotImplementedError

    async def settle(self, finish: Callable[..., None], *args: Any) -> None:
        raise NotImplementedError

    async def guard(self) -> None:
        raise NotImplementedError

    def _finish(self, task_id: int, state: TaskState, error: str | None) -> None:
        raise NotImplementedError

    async def _attention(self, vm: str, reason: str, warnings: list[str]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    async def _run_guarded(
        self,
        task_id: int,
        hosts: list[str],
        resumed: bool,
        body: Callable[[asyncio.Event], Awaitable[tuple[TaskState, str | None]]],
        on_crash: Callable[[], Awaitable[None]] | None = None,
        priority: Priority = "normal",
    ) -> None:
        """Per-host slots, queued-cancel, running mark, the end state; a bug still ends the
        task, visibly."""
        cancel = self._cancel[task_id]
        try:
            async with contextlib.AsyncExitStack() as slots:
                taken = await self._take(slots, hosts, priority, None if resumed else cancel)
                started = resumed or (
                    taken and not cancel.is_set() and await self._begin(task_id, hosts, cancel)
                )
                if not started:
                    await self.settle(
                        self._finish, task_id, TaskState.CANCELLED, "cancelled while queued"
                    )
                    return
                state, error = await body(cancel)
                await self.settle(self._finish, task_id, state, error)
        except LeaseLost as exc:  # another replica goes on with it: nothing more here
            log.warning("task %d: %s; stopped here", task_id, exc)
        except Exception as exc:
            log.exception("task %d crashed", task_id)
            if on_crash is not None:
                try:  # what the task holds on the hosts is let go where it safely can be
                    await on_crash()
                except Exception:
                    log.exception("task %d: cleanup after the crash failed", task_id)
            with contextlib.suppress(LeaseLost):
                await self.settle(self._finish, task_id, TaskState.FAILED, f"internal error: {exc}")
        finally:
            self._forget(task_id)

    @staticmethod
    def _record_step(
        s: Session,
        t: Task,
        phase: str,
        machine: dict[str, object],
        note: str | None,
        warnings: tuple[str, ...],
    ) -> None:
        previous = t.phase
        t.phase = phase
        t.machine = machine
        if previous != t.phase:
            s.add(TaskEvent(task=t, kind="phase", message=note or t.phase, data={"phase": t.phase}))
        elif note:
            s.add(TaskEvent(task=t, kind="note", message=note))
        for w in warnings:
            if not any(e.message == w for e in t.events):
                s.add(TaskEvent(task=t, kind="warning", message=w))

    def _insert(
        self,
        vm: str,
        source: str,
        destination: str,
        kind: str,
        params: dict[str, Any],
        message: str,
    ) -> TaskOut:
        try:
            with self.db.session() as s:
                t = Task(
                    kind=kind,
                    state=TaskState.QUEUED,
                    vm=vm,
                    source=source,
                    destination=destination,
                    params=params,
                    phase=Phase.QUEUED,
                )
                self.membership.stamp(t)
                s.add(t)
                s.flush()
                s.add(TaskEvent(task=t, kind="queued", message=message))
                return task_out(t, with_events=False)
        except IntegrityError as exc:
            raise Conflict(
                f"VM {vm} is already migrating", code="already_migrating", vm=vm
            ) from exc

    def _disk_task_resumer(
        self, s: Session, t: Task
    ) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """How a disk task left running by a previous manager goes on (None: not one)."""
        assert t.machine is not None
        if t.kind == COLD_MIGRATE:
            params = t.params or {}
            spec = params.get("spec") or self.inventory.vm_by_name(s, t.vm or "").spec
            port = AgentColdPort(
                self.db,
                self.inventory,
                VmSpec.model_validate(spec),
                host_copy(self.inventory.host_by_name(s, t.source or "")),
                host_copy(self.inventory.host_by_name(s, t.destination or "")),
                (t.params or {}).get("datastore"),
                (t.params or {}).get("disk_format"),
            )
            start = cold.step(cold.state_from_json(t.machine), cold.Restarted())
            task_id = t.id
            return lambda: self._run_cold(task_id, port, start, resumed=True)
        if t.kind == STORAGE_MOVE:
            host = host_copy(self.inventory.host_by_name(s, t.source or ""))
            mreq = MirrorRequest.model_validate(t.params or {})
            sstate = storage.state_from_json(t.machine)
            task_id, vm = t.id, t.vm or ""
            return lambda: self._run_storage_move(task_id, vm, host, mreq, resume=sstate)
        return None

    # ------------------------------------------------------------------ verdicts

    def refusals(self, vm: str, to: str | None, datastore: str | None) -> list[Refusal]:
        """What submitting ``vm`` to ``to`` (and ``datastore``) would refuse at once, from the
        inventory alone: the pre-checks of the live, storage or cold move the submission
        would make, by the same code. Not here: the must rules (DRS's ``check_move``) and
        what only an agent answers (free space for copied disks, a stopped VM's definition
        on its host), which the submission asks."""
        return self.target_refusals(vm, [to], datastore)[to]

    def target_refusals(
        self, vm: str, targets: Sequence[str | None], datastore: str | None
    ) -> dict[str | None, list[Refusal]]:
        """``refusals`` for each of ``targets``, the inventory read once."""
        with self.db.session() as s:
            row = self.inventory.vm_by_name(s, vm)
            hosts = self.inventory.host_views(s)
            return {to: self._refusals(s, row, to, datastore, hosts) for to in targets}

    def _refusals(
        self,
        s: Session,
        row: Vm,
        to: str | None,
        datastore: str | None,
        hosts: dict[str, HostView],
    ) -> list[Refusal]:
        # Dispatched as submit_migration does, on the inventory's word for the VM's state
        # (the submission confirms a stopped one with its host).
        migrating = self.db.active_task_for_vm(s, row.name) is not None
        if to is not None and not migrating and row.state in (VmState.STOPPED, "suspended"):
            spec = VmSpec.model_validate(row.spec)
            return self._cold_refusals(s, row, spec, to, datastore, hosts)
        if datastore is not None and to in (None, row.host.name):
            return self._storage_refusals(s, row, datastore, None)
        if to is None:
            return [Refusal("invalid", "give the destination host", 422, field="to")]
        return precheck(self._live_input(s, row, to, datastore, hosts))

    def _live_input(
        self, s: Session, row: Vm, to: str, copy_to: str | None, hosts: dict[str, HostView]
    ) -> PrecheckInput:
        """A live migration's pre-check input (shared-nothing with ``copy_to``)."""
        spec = VmSpec.model_validate(row.spec)
        migrating = self.db.active_task_for_vm(s, row.name) is not None
        return PrecheckInput(
            vm_view(spec, row.host.name, row.state, migrating, row.attention),
            to,
            hosts,
            tls=self.inventory.tls,
            copy_to=copy_to,
            not_shared=self.inventory.not_shared(s, spec, row.host.name, to),
        )

    def _storage_refusals(
        self, s: Session, row: Vm, datastore: str, disk_format: DiskFormat | None
    ) -> list[Refusal]:
        """A storage move's pre-checks, but for free space (its agent's)."""
        spec = VmSpec.model_validate(row.spec)
        facts = row.host.facts or {}
        return attention_refusals(row.name, row.attention) + storage_prechecks(
            spec,
            VmState(row.state),
            row.host.name,
            frozenset(d["name"] for d in facts.get("datastores", ())),
            datastore,
            disk_format,
            self.db.active_task_for_vm(s, row.name) is not None,
        )

    def _cold_refusals(
        self,
        s: Session,
        row: Vm,
        spec: VmSpec,
        to: str,
        datastore: str | None,
        hosts: dict[str, HostView],
    ) -> list[Refusal]:
        """A cold migration's pre-checks on the VM's definition ``spec``."""
        used = {d.datastore for d in spec.disks}
        if spec.saved_state is not None:
            used.add(spec.saved_state.datastore)
        not_shared = self.inventory.not_shared(s, spec, row.host.name, to)
        live = precheck(
            PrecheckInput(
                vm_view(spec, row.host.name, row.state, False, row.attention), to, hosts, tls=False
            )
        )
        target = hosts.get(to)
        return cold_refusals(
            live,
            datastore,
            frozenset(used),
            target.datastores if target is not None else frozenset(),
            to,
            not_shared,
        )

    # ------------------------------------------------------------------ cold migration

    def _host_of(self, vm: str) -> str:
        with self.db.session() as s:
            return self.inventory.vm_by_name(s, vm).host.name

    def _stopped(self, vm: str) -> bool:
        """Whether the VM is stopped (or suspended): the inventory's word, confirmed by its
        host when it says so (the inventory may lag). One the inventory has running goes the
        live way, whose pre-checks and first step ask its host anyway."""
        with self.db.session() as s:
            if self.db.active_task_for_vm(s, vm) is not None:
                return False  # its live pre-checks refuse it as already migrating
            if self.inventory.vm_by_name(s, vm).state not in (VmState.STOPPED, "suspended"):
                return False
        return self.inventory.show_vm(vm).state in (VmState.STOPPED, VmState.SUSPENDED)

    def _check_cold(self, vm: str, req: MigrateRequest) -> tuple[VmSpec, Host, Host]:
        to = req.to
        assert to is not None
        knobs = [k for k in ("max_downtime_ms", "timeout_s", "bandwidth") if getattr(req, k)]
        if knobs or req.allow_postcopy:
            raise Invalid(
                f"{', '.join(knobs) or 'allow_postcopy'}: {vm} is stopped; a cold migration "
                "copies its disks and moves its definition, those apply to a running VM",
                field=(knobs or ["allow_postcopy"])[0],
                vm=vm,
            )
        with self.db.session() as s:
            row = self.inventory.vm_by_name(s, vm)
            # The source agent's definition is the VM's (a suspend or resume whose answer
            # the manager missed changed it there); it also says the VM is still stopped.
            info = self.inventory.call(row.host, lambda c: c.vm(vm), vm=vm)
            if info.state not in (VmState.STOPPED, VmState.SUSPENDED):
                raise Conflict(f"VM {vm} is {info.state} on {row.host.name}", vm=vm)
            spec = info.spec
            hosts = self.inventory.host_views(s)
            refusals = self._cold_refusals(s, row, spec, to, req.datastore, hosts)
            if not refusals:
                src = host_copy(row.host)
                dst = host_copy(self.inventory.host_by_name(s, to))
        raise_refusals(refusals, vm)
        return spec, src, dst

    async def submit_cold(self, vm: str, req: MigrateRequest) -> TaskOut:
        """A stopped VM to another host: its disks copied (with --datastore) and verified,
        or only its definition moved (its datastores reachable from there)."""
        spec, src, dst = await asyncio.to_thread(self._check_cold, vm, req)
        what = f"to datastore {req.datastore}" if req.datastore else "definition only"

        out = await asyncio.to_thread(
            self._insert,
            vm,
            src.name,
            dst.name,
            COLD_MIGRATE,
            {
                "datastore": req.datastore,
                "disk_format": req.disk_format,
                # The source agent's definition at submission: a resumed task uses it too.
                "spec": spec.model_dump(mode="json"),
            },
            f"cold migration of {vm}: {src.name} -> {dst.name} ({what})" + _noted(req),
        )
        port = AgentColdPort(
            self.db, self.inventory, spec, src, dst, req.datastore, req.disk_format
        )
        self._cancel[out.id] = asyncio.Event()
        self._launch(
            out.id,
            self._run_cold(
                out.id,
                port,
                cold.first(req.datastore is not None),
                priority=req.priority or "normal",
            ),
        )
        return out

    async def _run_cold(
        self,
        task_id: int,
        port: AgentColdPort,
        start: cold.CStep,
        resumed: bool = False,
        priority: Priority = "normal",
    ) -> None:
        last = [start.state.phase]

        async def body(cancel: asyncio.Event) -> tuple[TaskState, str | None]:
            async def persist(st: cold.CStep) -> None:
                last[0] = st.state.phase
                await asyncio.to_thread(self._persist_cold, task_id, st)

            final = await cold.run(port, persist, cancel, start, guard=self.guard)
            state = {
                cold.CPhase.DONE: TaskState.SUCCEEDED,
                cold.CPhase.CANCELLED: TaskState.CANCELLED,
            }.get(final.phase, TaskState.FAILED)
            return state, final.error if state != TaskState.SUCCEEDED else None

        async def on_crash() -> None:
            # Before the destination has the VM: exports ended, hold released, copies gone.
            if last[0] in (cold.CPhase.EXPORT, cold.CPhase.COPY, cold.CPhase.ROLLBACK):
                await port.abort()

        hosts = [port.source.name, port.destination.name]
        await self._run_guarded(task_id, hosts, resumed, body, on_crash, priority)

    def _persist_cold(self, task_id: int, st: cold.CStep) -> None:
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            order = list(cold.CPhase)
            if st.state.phase in order[:4]:
                t.progress = max(t.progress, order.index(st.state.phase) / 4)
            self._record_step(
                s, t, st.state.phase.value, cold.state_to_json(st.state), st.note, st.state.warnings
            )

    # ------------------------------------------------------------------ storage moves

    def _check_storage(self, vm: str, req: MigrateRequest) -> tuple[Host, MirrorRequest]:
        assert req.datastore is not None
        with self.db.session() as s:
            row = self.inventory.vm_by_name(s, vm)
            refusals = self._storage_refusals(s, row, req.datastore, req.disk_format)
            host_row = host_copy(row.host)
        raise_refusals(refusals, vm)
        speed = None
        if req.bandwidth:
            try:
                speed = parse_rate_bytes(req.bandwidth)
            except ValueError as exc:
                raise Invalid(f"bandwidth: {exc}", field="bandwidth", vm=vm) from exc
        mreq = MirrorRequest(datastore=req.datastore, format=req.disk_format, speed=speed)
        # Only the agent sees the datastore's free space and the disks' allocation: asked
        # now, so a refusal is this request's error (nothing created), not a failed task.
        self.inventory.call(host_row, lambda c: c.storage_move_check(vm, mreq), vm=vm)
        return host_row, mreq

    async def submit_storage_move(self, vm: str, req: MigrateRequest) -> TaskOut:
        """Storage vMotion: the VM's disks to another datastore, the VM stays on its host."""
        host, mreq = await asyncio.to_thread(self._check_storage, vm, req)

        out = await asyncio.to_thread(
            self._insert,
            vm,
            host.name,
            host.name,
            STORAGE_MOVE,
            mreq.model_dump(),
            f"storage move of {vm} to datastore {mreq.datastore} (on {host.name})" + _noted(req),
        )
        self._cancel[out.id] = asyncio.Event()
        self._launch(
            out.id,
            self._run_storage_move(out.id, vm, host, mreq, priority=req.priority or "normal"),
        )
        return out

    async def _run_storage_move(
        self,
        task_id: int,
        vm: str,
        host: Host,
        mreq: MirrorRequest,
        resume: storage.StorageState | None = None,
        priority: Priority = "normal",
    ) -> None:
        async def body(cancel: asyncio.Event) -> tuple[TaskState, str | None]:
            port = AgentStoragePort(self.db, self.inventory, vm, host, mreq)

            async def persist(st: storage.Step, status: MirrorStatus | None) -> None:
                await asyncio.to_thread(self._persist_storage, task_id, st, status)

            final = await storage.run(port, persist, cancel, resume, guard=self.guard)
            # Whatever the outcome, the inventory names what the agent's definition names
            # (what QEMU runs on): a later live migration opens those files.
            with contextlib.suppress(StoragePortError):
                await port.adopt()
            if final.attention is not None:
                await self._attention(vm, final.attention, [])
            state = {
                storage.SPhase.DONE: TaskState.SUCCEEDED,
                storage.SPhase.CANCELLED: TaskState.CANCELLED,
            }.get(final.phase, TaskState.FAILED)
            return state, final.error if state != TaskState.SUCCEEDED else None

        await self._run_guarded(task_id, [host.name], resume is not None, body, priority=priority)

    def _persist_storage(self, task_id: int, st: storage.Step, status: MirrorStatus | None) -> None:
        with self.db.session() as s:
            t = self.owned_task(s, task_id)
            if status is not None:
                t.stats = status.model_dump(mode="json")
                if status.total_bytes:
                    done = 1.0 - status.remaining_bytes / status.total_bytes
                    t.progress = max(t.progress, min(done, 0.99))
            self._record_step(
                s,
                t,
                st.state.phase.value,
                storage.state_to_json(st.state),
                st.note,
                st.state.warnings,
            )


def _noted(req: MigrateRequest) -> str:
    return ", high priority" if req.priority == "high" else ""
