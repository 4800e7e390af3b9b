"""Shared-nothing live migration of real TCG guests writing to their disks: the disk is
mirrored into an empty one on the other host's local datastore while the guest runs, then
RAM moves and both switch over together; on a fault or a cancel the VM keeps running on its
source disk and nothing of it is left on the destination."""

from __future__ import annotations

import subprocess
import time

import pytest

from qmotion.api.server import DiskCreate, MigrateRequest, TaskState, VmOut
from qmotion.api.vm import VmState
from qmotion.client import Conflict, Invalid
from qmotion.client.server import ServerClient
from qmotion.hypervisor.process import is_qemu_of
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import mem_check, wait_echo

from .conftest import MakeVm, ip_of, wait_task
from .test_cold import defined_on
from .test_storage import acked, allocated, assert_disk_intact, ds_path, filled, wait_phase

MiB = 1 << 20


def local_vm(lab: Lab, server: ServerClient, make_vm: MakeVm, data_mib: int, **kw: object) -> VmOut:
    """A running VM on h1 whose disk is on h1's local datastore, with ``data_mib`` MiB written
    before it boots (beyond its disk writer's records), the rest of 256 MiB unallocated."""
    vm = make_vm("h1", start=False, disk=DiskCreate(datastore="local-h1", size_mib=256), **kw)
    path = ds_path(lab, "local-h1") / vm.disks[0].path
    if data_mib:
        subprocess.run(
            ["qemu-io", "-c", f"write -P 0x5a 128M {data_mib}M", str(path)],
            check=True,
            capture_output=True,
        )
    server.start_vm(vm.name)
    ip = ip_of(vm)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
    assert run_in(lab.record.client_namespace, lambda: mem_check(ip))["consistent"]
    return server.vm(vm.name)


def assert_stayed_on_h1(lab: Lab, server: ServerClient, vm: VmOut) -> None:
    """Rolled back: the VM runs on h1 from its own disk; h2 holds nothing of it."""
    old = ds_path(lab, "local-h1") / vm.disks[0].path
    shown = server.vm(vm.name)
    assert shown.state == VmState.RUNNING and shown.host == "h1" and not shown.migrating
    assert [d.datastore for d in shown.disks] == ["local-h1"] and old.is_file()
    assert defined_on(lab, vm.name) == ["h1"]
    left = [p for p in ds_path(lab, "local-h2").rglob("*") if vm.name in str(p)]
    assert left == [], left


def test_shared_nothing_moves_a_writing_guest_with_its_disk(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = local_vm(lab, server, make_vm, data_mib=48)
    ip = ip_of(vm)
    old = ds_path(lab, "local-h1") / vm.disks[0].path
    source_alloc = allocated(old)
    before = acked(lab, ip)
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2"))
    task = wait_task(server, task, timeout_s=240)
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    assert task.mirror is not None and task.mirror.copy_mode == "write-blocking"
    assert task.result is not None and task.result.disk_copy_ms is not None
    # The VM runs on h2 from its copy, in the inventory and in h2's definition; h1 forgot it.
    shown = server.vm(vm.name)
    assert shown.host == "h2" and shown.state == VmState.RUNNING
    assert [d.datastore for d in shown.disks] == ["local-h2"]
    assert defined_on(lab, vm.name) == ["h2"]
    assert lab.agent("h2").vm(vm.name).spec.disks[0].datastore == "local-h2"
    new = ds_path(lab, "local-h2") / shown.disks[0].path
    assert new.is_file() and not old.exists(), (new, old)
    # Thin stays thin: what the source never allocated was not written.
    assert allocated(new) <= 1.1 * source_alloc + 4 * MiB, (allocated(new), source_alloc)
    assert allocated(new) >= 48 * MiB
    # The guest kept writing through the move: every acknowledged record is there, memory too.
    assert acked(lab, ip) > before
    assert_disk_intact(lab, ip)
    # Its definition on h2 names the copy: a stop and start there finds the same records.
    server.stop_vm(vm.name, force=True)
    server.start_vm(vm.name)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
    assert_disk_intact(lab, ip)


def test_cancel_during_the_disk_copy_keeps_the_vm_on_its_source(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = local_vm(lab, server, make_vm, data_mib=96)
    ip = ip_of(vm)
    # 8 MB/s: the copy takes ~12 s, the cancel comes in the middle of it.
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2", bandwidth="8M/s"))
    task = wait_phase(server, task, "mirror")
    time.sleep(2)
    running = server.task(task.id)
    assert running.mirror is not None and running.mirror.remaining_bytes > 0, running
    server.cancel_task(task.id)
    task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.CANCELLED, (task.error, [e.message for e in task.events])
    assert_stayed_on_h1(lab, server, vm)
    assert_disk_intact(lab, ip)


def test_cancel_during_the_memory_copy_keeps_the_vm_on_its_source(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    # A small disk is in sync in moments; 200 MiB of memory at 8 MB/s takes ~25 s.
    vm = local_vm(lab, server, make_vm, data_mib=0, memory="512M", fill=200)
    ip = ip_of(vm)
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2", bandwidth="8M/s"))
    task = wait_phase(server, task, "monitor", timeout_s=120)
    assert task.phase == "monitor", (task.state, task.error)
    time.sleep(2)
    server.cancel_task(task.id)
    task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.CANCELLED, (task.error, [e.message for e in task.events])
    assert_stayed_on_h1(lab, server, vm)
    assert_disk_intact(lab, ip)
    # The source's mirror ended with the cancel: a second attempt starts cleanly and moves it.
    task = wait_task(
        server, server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2")), 240
    )
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    assert server.vm(vm.name).host == "h2"
    assert_disk_intact(lab, ip)


def test_destination_killed_mid_copy_keeps_the_vm_on_its_source(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = local_vm(lab, server, make_vm, data_mib=96)
    ip = ip_of(vm)
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2", bandwidth="8M/s"))
    task = wait_phase(server, task, "mirror")
    time.sleep(2)
    dest = lab.agent("h2").vm(vm.name)
    assert dest.pid is not None
    subprocess.run(["kill", "-9", str(dest.pid)], check=True)
    task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.FAILED, (task.state, [e.message for e in task.events])
    assert not is_qemu_of(dest.pid, dest.uuid)
    assert_stayed_on_h1(lab, server, vm)
    assert_disk_intact(lab, ip)


def test_a_destination_datastore_that_fills_up_fails_the_migration_safely(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = local_vm(lab, server, make_vm, data_mib=40)
    ip = ip_of(vm)
    # The small datastore (64 MiB tmpfs) has room for the disk when the copy starts...
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="small", bandwidth="8M/s"))
    task = wait_phase(server, task, "mirror")
    # ...and not any more once something else takes 40 MiB of it mid-copy.
    with filled(ds_path(lab, "small"), 40):
        task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.FAILED, (task.state, [e.message for e in task.events])
    assert_stayed_on_h1(lab, server, vm)
    assert list(ds_path(lab, "small").iterdir()) == []
    assert_disk_intact(lab, ip)


def test_shared_nothing_refusals_name_the_datastore(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = make_vm("h1", fill=0, start=False, disk=DiskCreate(datastore="local-h1", size_mib=256))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x33 0 100M", str(ds_path(lab, "local-h1") / vm.disks[0].path)],
        check=True,
        capture_output=True,
    )
    server.start_vm(vm.name)
    # h2 cannot reach h1's local datastore: refused, naming it and the flag that copies it.
    with pytest.raises(Conflict, match=r"local-h1.*--datastore"):
        server.migrate(vm.name, MigrateRequest(to="h2"))
    with pytest.raises(Invalid, match="not available on host h2") as unknown:
        server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h3"))
    assert unknown.value.detail.field == "datastore"
    # 100 MiB allocated does not fit the 64 MiB datastore: refused before anything changed.
    with pytest.raises(Invalid, match="MiB free") as full:
        server.migrate(vm.name, MigrateRequest(to="h2", datastore="small"))
    assert full.value.detail.field == "datastore"
    assert defined_on(lab, vm.name) == ["h1"] and not server.vm(vm.name).migrating
    assert list(ds_path(lab, "small").iterdir()) == []
