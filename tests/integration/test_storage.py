"""Storage vMotion on real TCG guests whose disk writer keeps writing sequence-numbered,
checksummed O_DSYNC records: the disks move (or, on a fault or a cancel, stay), the guest
never notices, no acknowledged record is lost, and nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.api.server import DiskCreate, MigrateRequest, TaskOut, TaskState, VmOut
from qmotion.api.vm import VmState
from qmotion.client import Conflict, Invalid
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import disk_status, disk_verify, mem_check, wait_echo

from .conftest import MakeVm, ip_of, wait_task

MiB = 1 << 20


def ds_path(lab: Lab, name: str) -> Path:
    return Path(next(d.path for d in lab.record.datastores if d.name == name))


def allocated(path: Path) -> int:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return int(info["actual-size"])


def vm_with_data(lab: Lab, server: ServerClient, make_vm: MakeVm, data_mib: int) -> VmOut:
    """A VM whose disk on ``shared`` holds ``data_mib`` MiB written before it boots (beyond
    the slots its disk writer uses first), the rest of its 256 MiB unallocated."""
    vm = make_vm("h1", fill=16, start=False, disk=DiskCreate(datastore="shared", size_mib=256))
    path = ds_path(lab, "shared") / vm.disks[0].path
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


def acked(lab: Lab, ip: str) -> int:
    return int(run_in(lab.record.client_namespace, lambda: disk_status(ip))["acked"])


def assert_disk_intact(lab: Lab, ip: str) -> None:
    result = run_in(lab.record.client_namespace, lambda: disk_verify(ip))
    assert result["intact"] is True and result["lost"] == 0, result
    assert run_in(lab.record.client_namespace, lambda: mem_check(ip))["consistent"]


@contextlib.contextmanager
def filled(datastore: Path, mib: int) -> Iterator[None]:
    """Something else takes ``mib`` MiB of the datastore (as much as fits) until the end."""
    filler = datastore / "filler"
    try:
        with open(filler, "wb") as fh:
            for _ in range(mib):
                try:
                    fh.write(b"\xa5" * MiB)
                    fh.flush()
                except OSError:
                    break
        yield
    finally:
        filler.unlink(missing_ok=True)


def wait_phase(server: ServerClient, task: TaskOut, phase: str, timeout_s: float = 60) -> TaskOut:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = server.task(task.id)
        if task.phase == phase or not task.state.active:
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task.id} never reached {phase}: {task.phase}")


def test_storage_vmotion_moves_a_writing_guests_disk_and_keeps_it_thin(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=48)
    ip = ip_of(vm)
    old = ds_path(lab, "shared") / vm.disks[0].path
    source_alloc = allocated(old)
    before = acked(lab, ip)
    task = server.migrate(vm.name, MigrateRequest(datastore="local-h1"))
    task = wait_task(server, task, timeout_s=180)
    assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
    assert task.mirror is not None and task.mirror.copy_mode == "write-blocking"
    # The disk is on local-h1 now, in the manager's inventory and in the agent's definition.
    shown = server.vm(vm.name)
    assert shown.host == "h1" and shown.state == VmState.RUNNING
    assert [d.datastore for d in shown.disks] == ["local-h1"]
    assert lab.agent("h1").vm(vm.name).spec.disks[0].datastore == "local-h1"
    new = ds_path(lab, "local-h1") / shown.disks[0].path
    assert new.is_file() and not old.exists(), (new, old)
    # Thin stays thin: the copy skipped what the source never allocated.
    assert shown.disks[0].allocated_bytes is not None
    assert allocated(new) <= 1.1 * source_alloc + 4 * MiB, (allocated(new), source_alloc)
    assert allocated(new) >= 48 * MiB
    # The guest kept writing through the move, and every acknowledged record is there.
    assert acked(lab, ip) > before
    assert_disk_intact(lab, ip)
    # The moved VM still runs off its new disk after a stop and start (the definition).
    server.stop_vm(vm.name, force=True)
    server.start_vm(vm.name)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
    assert_disk_intact(lab, ip)


def assert_on_old_disk(lab: Lab, server: ServerClient, vm: VmOut, target_ds: str) -> None:
    """Rolled back: the VM runs on h1 from its old disk, the target holds none of its files."""
    old = ds_path(lab, "shared") / vm.disks[0].path
    shown = server.vm(vm.name)
    assert shown.state == VmState.RUNNING and shown.host == "h1" and not shown.migrating
    assert [d.datastore for d in shown.disks] == ["shared"] and old.is_file()
    assert lab.agent("h1").vm(vm.name).spec.disks[0].datastore == "shared"
    left = [p for p in ds_path(lab, target_ds).rglob("*") if vm.name in str(p)]
    assert left == [], left


def test_cancel_during_the_mirror_leaves_the_vm_on_its_old_disk(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=96)
    ip = ip_of(vm)
    # 8 MB/s: the copy takes ~12 s, the cancel comes in the middle of it.
    task = server.migrate(vm.name, MigrateRequest(datastore="local-h1", bandwidth="8M/s"))
    task = wait_phase(server, task, "mirror")
    time.sleep(2)
    running = server.task(task.id)
    assert running.mirror is not None and running.mirror.remaining_bytes > 0
    server.cancel_task(task.id)
    task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.CANCELLED, (task.error, [e.message for e in task.events])
    assert_on_old_disk(lab, server, vm, "local-h1")
    assert_disk_intact(lab, ip)


def test_a_datastore_that_fills_up_fails_the_move_and_leaves_the_vm_on_its_old_disk(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=40)
    ip = ip_of(vm)
    # The small datastore (64 MiB tmpfs) has room for the disk when the move starts...
    task = server.migrate(vm.name, MigrateRequest(datastore="small", bandwidth="8M/s"))
    task = wait_phase(server, task, "mirror")
    # ...and not any more once something else takes 40 MiB of it mid-copy.
    with filled(ds_path(lab, "small"), 40):
        task = wait_task(server, task, timeout_s=120)
    assert task.state == TaskState.FAILED, (task.state, [e.message for e in task.events])
    assert "space" in (task.error or ""), task.error
    assert_on_old_disk(lab, server, vm, "small")
    assert_disk_intact(lab, ip)


def test_a_datastore_without_room_is_refused_at_submission(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = vm_with_data(lab, server, make_vm, data_mib=80)
    with pytest.raises(Invalid, match="MiB free") as refused:
        server.migrate(vm.name, MigrateRequest(datastore="small"))
    assert refused.value.detail.field == "datastore"
    assert not server.vm(vm.name).migrating
    assert list(ds_path(lab, "small").iterdir()) == []


def test_storage_move_prechecks_refuse_before_anything_changes(
    lab: Lab, server: ServerClient, make_vm: MakeVm
) -> None:
    vm = make_vm("h1", fill=0, start=False, disk=DiskCreate(datastore="shared", size_mib=16))
    with pytest.raises(Conflict, match="needs it running"):
        server.migrate(vm.name, MigrateRequest(datastore="local-h1"))
    server.start_vm(vm.name)
    with pytest.raises(Invalid, match="not reachable from host h1") as unreachable:
        server.migrate(vm.name, MigrateRequest(datastore="local-h2"))
    assert unreachable.value.detail.field == "datastore"
    with pytest.raises(Conflict, match="already on datastore shared"):
        server.migrate(vm.name, MigrateRequest(datastore="shared"))
    with pytest.raises(Invalid, match="both hosts share"):
        server.migrate(vm.name, MigrateRequest(to="h2", datastore="shared"))
    with pytest.raises(ValueError, match="timeout_s apply to a live migration"):
        MigrateRequest(datastore="local-h1", timeout_s=60)
    # The disk is 16 MiB virtual, nearly empty: a small datastore has room. A fake one not.
    with pytest.raises(Invalid, match="not reachable"):
        server.migrate(vm.name, MigrateRequest(datastore="nosuch"))
    assert server.vm(vm.name).disks[0].datastore == "shared"
    assert not server.vm(vm.name).migrating
