"""The same faults on real TCG guests: at each phase of a live migration (prepare, copy, device
state, switchover, verify) each fault (destination agent killed, source agent killed, migration
link down, manager SIGKILLed), held a few seconds and undone, with the guest writing memory and
O_DSYNC disk records and a TCP echo session open. Afterwards exactly one copy runs, the
inventory names its host, the memory checker and every acknowledged disk record are intact.

``make test`` runs the four unmarked representative cases; ``make faults`` runs the whole
matrix and writes its table to bench/results/faults.md (the injection, the phase triggers, the
checks and the table are in ``faults``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qmotion.api.server import DiskCreate, MigrateRequest, TaskOut, TaskState
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import disk_verify, mem_check, mem_status

from .conftest import MakeVm, ip_of
from .faults import (
    MATRIX,
    SLOW_LINK_BPS,
    Agents,
    GuestWatch,
    Row,
    await_phase,
    inject,
    remove_everywhere,
    settle,
    wait_end,
    write_table,
)

pytestmark = pytest.mark.integration

# One case per fault and per phase, run by `make test`; `make faults` runs them all.
REPRESENTATIVE = {
    ("copy", "destination_agent"),
    ("device", "migration_link"),
    ("switchover", "manager"),
    ("verify", "source_agent"),
}
CASES = [
    pytest.param(
        phase,
        fault,
        id=f"{phase}-{fault}",
        marks=() if (phase, fault) in REPRESENTATIVE else pytest.mark.faults,
    )
    for phase, fault in MATRIX
]
MEMORY = "512M"
DIRTY_MIB_S = 2.0
DISK_MIB = 64  # 16k record slots: at 50 records/s no slot is reused within a case
MAX_ATTEMPTS = 3  # a phase missed by the trigger: the VM moves back and the case tries again
CASE_TIMEOUT_S = 1500


@dataclass(frozen=True)
class Shape:
    """The guest and the migration a phase needs to be hit."""

    fill_mib: int
    bandwidth: str | None = None  # QEMU's cap: the copy lasts seconds
    # The link itself slowed and a large final chunk allowed: the stop-and-copy lasts seconds
    # (QEMU lifts its own cap for it).
    slow_link: bool = False


SHAPES = {
    "prepare": Shape(96),
    "copy": Shape(160, bandwidth="20M/s"),
    "device": Shape(160, slow_link=True),
    "switchover": Shape(96),
    "verify": Shape(96),
}


@pytest.fixture(scope="module")
def fault_rows() -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    if rows:
        print(f"\nfault table: {write_table(rows)}")


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize(("phase", "fault"), CASES)
def test_fault_leaves_one_running_copy_with_its_data(
    lab: Lab, make_vm: MakeVm, fault_rows: list[Row], phase: str, fault: str
) -> None:
    row = Row(phase, fault)
    fault_rows.append(row)
    revived = lab.revive()
    if revived:
        row.notes.append(f"started again before the case (an earlier one ended midway): {revived}")
    try:
        run_case(lab, make_vm, row)
        row.result = "pass"
    except BaseException as exc:  # recorded in the table, then raised as it came
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        row.result = f"FAIL: {first[:200]}"
        raise


def run_case(lab: Lab, make_vm: MakeVm, row: Row) -> None:
    shape = SHAPES[row.phase]
    vm = make_vm(
        "h1",
        memory=MEMORY,
        fill=shape.fill_mib,
        dirty=DIRTY_MIB_S,
        disk=DiskCreate(datastore="shared", size_mib=DISK_MIB),
    )
    ip, ns = ip_of(vm), lab.record.client_namespace
    boot = run_in(ns, lambda: mem_status(ip))["boot_id"]
    watch, agents = GuestWatch(ns, ip), Agents(lab)
    watch.start()
    try:
        with contextlib.ExitStack() as slowed, lab.server(timeout_s=60) as client:
            task = drive(lab, client, vm.name, row, watch, agents, slowed)
            inject(lab, row.fault, row.source, row.destination)
            restored = time.monotonic()
            done = wait_end(client, task.id)
            slowed.close()  # the link back to its own speed before settling
            row.task = f"{done.state}/{done.phase}"
            if done.error:
                row.notes.append(f"task: {done.error}")
            settled = settle(lab, client, vm)
            row.settle_s = round(time.monotonic() - restored, 1)
            row.ended_on = settled.host
        row.echo = watch.stop()  # the samples end before the final read-back
        check_data(lab, ip, boot, watch, row)
    finally:
        row.echo = watch.stop()
        agents.close()
        remove_everywhere(lab, vm.name)


def drive(
    lab: Lab,
    client: ServerClient,
    name: str,
    row: Row,
    watch: GuestWatch,
    agents: Agents,
    stack: contextlib.ExitStack,
) -> TaskOut:
    """Migrate the VM until the trigger catches the case's phase; returns that migration's task
    (its slowed link, if any, stays slow until ``stack`` closes)."""
    shape = SHAPES[row.phase]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        row.attempts = attempt
        src = client.vm(name).host
        dst = "h2" if src == "h1" else "h1"
        row.source, row.destination = src, dst
        with contextlib.ExitStack() as link:
            if shape.slow_link:
                link.enter_context(lab.migration_link_rate(src, SLOW_LINK_BPS))
            task = client.migrate(name, MigrateRequest(to=dst, bandwidth=shape.bandwidth))
            hit = await_phase(client, task, row.phase, watch, agents)
            if hit is not None:
                row.hit = hit
                stack.enter_context(link.pop_all())
                return task
            missed = wait_end(client, task.id)
        assert missed.state == TaskState.SUCCEEDED, (
            f"try {attempt}: the migration failed before any fault: {missed.error}"
        )
        row.notes.append(f"try {attempt}: {row.phase} not caught, {src}→{dst} went through")
    raise AssertionError(f"{row.phase} not caught in {MAX_ATTEMPTS} migrations")


def check_data(lab: Lab, ip: str, boot: str, watch: GuestWatch, row: Row) -> None:
    """The same guest (same boot), its memory consistent, every record it acknowledged on
    disk, and no acknowledgement it gave the client ever taken back."""
    ns = lab.record.client_namespace
    mem = run_in(ns, lambda: mem_check(ip))
    disk = run_in(ns, lambda: disk_verify(ip))
    back = watch.went_back()
    row.memory = "consistent" if mem.get("consistent") is True else "INCONSISTENT"
    if mem.get("boot_id") != boot:
        row.memory += ", REBOOTED"
    intact = disk.get("intact") is True and disk.get("lost") == 0
    row.disk = (
        f"{'intact' if intact else 'LOST ' + str(disk.get('lost'))}: "
        f"{disk.get('acked')} acked, {watch.max_acked} seen before"
    )
    if back:
        row.disk += f", WENT BACK {back[:3]}"
    assert mem.get("consistent") is True, mem
    assert mem.get("boot_id") == boot, (mem, boot)
    assert intact, disk
    assert int(disk["acked"]) >= watch.max_acked, (disk, watch.max_acked)
    assert not back, f"acknowledged disk records went back (a stale copy ran): {back}"
