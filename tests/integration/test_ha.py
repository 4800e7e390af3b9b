"""Two manager replicas on one PostgreSQL: the one running a live migration is SIGKILLed (or
frozen past its lease) in the middle of the copy; the other takes the task over within two
leases and completes it, once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from qmotion.api.server import MigrateRequest, TaskState, VmCreate, VmOut, Workload
from qmotion.api.vm import VmState
from qmotion.client.server import ServerClient
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import run_in
from qmotion.probe.guest import mem_check, mem_status, wait_echo

from .conftest import ip_of, unique_lab_name, wait_task
from .test_migration import wait_phase

pytestmark = pytest.mark.integration
LEASE_S = 5.0


@pytest.fixture(scope="module")
def ha_lab() -> Iterator[Lab]:
    name = unique_lab_name()
    the_lab = lab_up(name, 2, postgres_db=True, managers=2, lease_s=LEASE_S)
    try:
        yield the_lab
    finally:
        lab_down(name)


def _client(lab: Lab, *urls: str) -> ServerClient:
    rec = lab.record
    assert rec.manager_token_file is not None
    token = Path(rec.manager_token_file).read_text().strip()
    return ServerClient(",".join(urls), token, timeout_s=60, ca_file=rec.manager_ca_file)


def _writing_guest(lab: Lab, c: ServerClient, name: str) -> tuple[VmOut, str, dict[str, Any]]:
    """A 512 MiB guest on h1 with 300 MiB written, still writing 2 MiB/s: its address and
    its memory checker's status before the move."""
    vm = c.create_vm(
        VmCreate.model_validate(
            {
                "name": name,
                "host": "h1",
                "memory": "512M",
                "start": True,
                "workload": Workload(fill_mib=300, dirty_mib_s=2),
            }
        )
    )
    ip = ip_of(vm)
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
    return vm, ip, run_in(lab.record.client_namespace, lambda: mem_status(ip))


def test_the_surviving_replica_completes_a_migration_whose_manager_was_killed(
    ha_lab: Lab,
) -> None:
    rec = ha_lab.record
    assert rec.manager_url is not None and [r.name for r in rec.replicas] == ["m2"]
    m2 = rec.replicas[0].url
    with _client(ha_lab, rec.manager_url) as a:
        vm, ip, before = _writing_guest(ha_lab, a, "ha1")
        assert run_in(rec.client_namespace, lambda: mem_check(ip))["consistent"]
        # Through replica m1, throttled so the copy is still under way when m1 dies.
        task = a.migrate(vm.name, MigrateRequest(to="h2", bandwidth="30M/s"))
        wait_phase(a, task, "monitor")
    ha_lab.kill_replica("m1")
    killed = datetime.now(UTC)
    # The CLI's way: both addresses, m1's first; it goes on through m2.
    with _client(ha_lab, rec.manager_url, m2) as both:
        done = wait_task(both, both.task(task.id), timeout_s=240)
        events = both.task(task.id).events
        assert done.state == TaskState.SUCCEEDED, (done.error, [e.message for e in events])
        (takeover,) = [e for e in events if "taken over by replica m2 from m1" in e.message]
        # Within two leases of the kill (m2 looks every third of a lease).
        assert (takeover.at - killed).total_seconds() <= 2 * LEASE_S + 1, takeover.at
        assert both.vm(vm.name).host == "h2"
        assert [e.message for e in events].count("succeeded") == 1
    # One copy runs, on h2, with its memory and its boot.
    assert vm.name not in [v.name for v in ha_lab.agent("h1").list_vms()]
    assert ha_lab.agent("h2").vm(vm.name).state == VmState.RUNNING
    after = run_in(rec.client_namespace, lambda: mem_check(ip))
    assert after["consistent"] and after["boot_id"] == before["boot_id"]


def test_a_replica_frozen_past_its_lease_gives_its_migration_up(ha_lab: Lab) -> None:
    """m1 runs the migration and freezes (SIGSTOP) for two leases: m2 takes it over and
    completes it. Thawed, m1 finds its lease ended and stops its work on the task before
    acting again: the move ends once, with one copy, the guest intact; m1 then serves again
    as a new epoch."""
    rec = ha_lab.record
    assert rec.manager_url is not None
    ha_lab.restart_manager()  # m1 again (killed above, or not): its name after a SIGKILL
    m1_pid = ha_lab.replica_pid("m1")
    assert m1_pid is not None
    urls = (rec.manager_url, rec.replicas[0].url)
    with _client(ha_lab, *urls) as both:
        vm, ip, before = _writing_guest(ha_lab, both, "ha2")
    with _client(ha_lab, rec.manager_url) as a:
        task = a.migrate(vm.name, MigrateRequest(to="h2", bandwidth="30M/s"))
        wait_phase(a, task, "monitor")
    os.kill(m1_pid, signal.SIGSTOP)
    try:
        with _client(ha_lab, urls[1]) as b:
            deadline = time.monotonic() + 4 * LEASE_S
            while not any("taken over by replica m2" in e.message for e in b.task(task.id).events):
                assert time.monotonic() < deadline, "m2 never took the task over"
                time.sleep(0.2)
    finally:
        os.kill(m1_pid, signal.SIGCONT)
    with _client(ha_lab, urls[1]) as b:
        done = wait_task(b, b.task(task.id), timeout_s=240)
        events = [e.message for e in b.task(task.id).events]
        assert done.state == TaskState.SUCCEEDED, (done.error, events)
        assert events.count("succeeded") == 1 and b.vm(vm.name).host == "h2"
    assert vm.name not in [v.name for v in ha_lab.agent("h1").list_vms()]
    assert ha_lab.agent("h2").vm(vm.name).state == VmState.RUNNING
    after = run_in(rec.client_namespace, lambda: mem_check(ip))
    assert after["consistent"] and after["boot_id"] == before["boot_id"]
    # m1 is back in service (a new epoch), answering on its own address.
    with _client(ha_lab, rec.manager_url) as a:
        assert a.vm(vm.name).host == "h2"
