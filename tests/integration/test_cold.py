"""Cold migration of stopped real guests: the disk copied over NBD and verified, the VM
defined on exactly one host, its records (written before it stopped) intact when it starts
there."""

from __future__ import annotations

import pytest

from qmotion.api.server import DiskCreate, MigrateRequest, TaskState
from qmotion.api.vm import VmState
from qmotion.client import Conflict, Invalid
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import disk_status, wait_echo

from .conftest import MakeVm, ip_of, wait_task
from .test_storage import allocated, assert_disk_intact, ds_path, vm_with_data

MiB = 1 << 20


def defined_on(lab: Lab, name: str) -> list[str]:
    return [h for h in ("h1", "h2", "h3") if name in [v.name for v in lab.agent(h).list_vms()]]


def test_a_stopped_vm_moves_with_its_disk_copied_and_verified(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=48)
    ip = ip_of(vm)
    acked = int(run_in(lab.record.client_namespace, lambda: disk_status(ip))["acked"])
    assert acked > 0
    old = ds_path(lab, "shared") / vm.disks[0].path
    server.stop_vm(vm.name)
    source_alloc = allocated(old)
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2"))
    task = wait_task(server, task, timeout_s=300)
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    shown = server.vm(vm.name)
    assert shown.host == "h2" and shown.state == VmState.STOPPED
    assert [d.datastore for d in shown.disks] == ["local-h2"]
    assert defined_on(lab, vm.name) == ["h2"]
    new = ds_path(lab, "local-h2") / shown.disks[0].path
    assert new.is_file() and not old.exists()
    assert allocated(new) <= 1.1 * source_alloc + 4 * MiB  # sparse: holes not written
    # Started on its new host, the guest finds every record it acknowledged before.
    server.start_vm(vm.name)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 120))
    status = run_in(lab.record.client_namespace, lambda: disk_status(ip))
    assert int(status["first"]) > acked, status  # it resumed after the copied records
    assert_disk_intact(lab, ip)


def test_a_stopped_vm_on_shared_storage_moves_its_definition_only(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = make_vm("h1", fill=0, start=False, disk=DiskCreate(datastore="shared", size_mib=16))
    disk = ds_path(lab, "shared") / vm.disks[0].path
    before = disk.stat().st_ino
    task = wait_task(server, server.migrate(vm.name, MigrateRequest(to="h3")), timeout_s=120)
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    assert server.vm(vm.name).host == "h3" and defined_on(lab, vm.name) == ["h3"]
    assert disk.stat().st_ino == before  # the same file: nothing copied
    server.start_vm(vm.name)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip_of(vm), 120))


def test_cold_migration_refusals_name_the_reason(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    local = make_vm("h1", fill=0, start=False, disk=DiskCreate(datastore="local-h1", size_mib=16))
    with pytest.raises(Conflict, match="--datastore") as unreachable:
        server.migrate(local.name, MigrateRequest(to="h2"))
    assert "local-h1" in str(unreachable.value)
    with pytest.raises(Invalid, match="already"):
        server.migrate(local.name, MigrateRequest(to="h2", datastore="local-h1"))
    with pytest.raises(Invalid, match="not reachable from h2"):
        server.migrate(local.name, MigrateRequest(to="h2", datastore="local-h3"))
    with pytest.raises(Invalid, match="stopped"):
        server.migrate(local.name, MigrateRequest(to="h2", timeout_s=60))
    assert server.vm(local.name).host == "h1" and defined_on(lab, local.name) == ["h1"]


def boot_mark(lab: Lab, ip: str) -> tuple[int, float]:
    """(first record of this boot, uptime): a resumed guest keeps the first and its clock
    goes on; a rebooted one starts a new first record after the newest and a new clock."""
    status = run_in(lab.record.client_namespace, lambda: disk_status(ip))
    return int(status["first"]), float(status["uptime_s"])


def test_suspend_and_resume_keep_the_guest_where_it_was(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=8)
    ip = ip_of(vm)
    first, up = boot_mark(lab, ip)
    shown = server.suspend_vm(vm.name)
    assert shown.state == VmState.SUSPENDED
    saved = server.vm(vm.name)
    info = lab.agent("h1").vm(vm.name)
    assert info.state == VmState.SUSPENDED and info.pid is None  # no QEMU runs it
    assert info.spec.saved_state is not None
    state_file = ds_path(lab, info.spec.saved_state.datastore) / info.spec.saved_state.path
    assert state_file.is_file() and saved.host == "h1"
    server.start_vm(vm.name)  # `vm resume`
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 60))
    # The same boot goes on (a reboot would start a new first record and a new clock).
    again, later = boot_mark(lab, ip)
    assert again == first and later > up, (first, up, again, later)
    assert_disk_intact(lab, ip)
    assert not state_file.exists() and server.vm(vm.name).state == VmState.RUNNING


def test_a_suspended_vm_moves_with_its_state_and_resumes_on_the_new_host(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=8)
    ip = ip_of(vm)
    first, up = boot_mark(lab, ip)
    server.suspend_vm(vm.name)
    old_state = lab.agent("h1").vm(vm.name).spec.saved_state
    assert old_state is not None
    task = server.migrate(vm.name, MigrateRequest(to="h2", datastore="local-h2"))
    task = wait_task(server, task, timeout_s=300)
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    assert defined_on(lab, vm.name) == ["h2"]
    info = lab.agent("h2").vm(vm.name)
    assert info.state == VmState.SUSPENDED and info.spec.saved_state is not None
    assert info.spec.saved_state.datastore == "local-h2"
    assert not (ds_path(lab, old_state.datastore) / old_state.path).exists()
    server.start_vm(vm.name)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 60))
    assert server.vm(vm.name).host == "h2"
    again, later = boot_mark(lab, ip)
    assert again == first and later > up, (first, up, again, later)  # resumed, not rebooted
    assert_disk_intact(lab, ip)
