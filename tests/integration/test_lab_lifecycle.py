"""``lab up`` then ``lab down`` with running VMs leaves no namespace, link, process or file;
on the way, a migration across the lab's emulated distance."""

from __future__ import annotations

import pwd
import subprocess
import time
from pathlib import Path

import pytest

from qmotion.api.server import MigrateRequest, TaskState, VmCreate, Workload
from qmotion.api.vm import GuestConfig, Nic, VmSpec
from qmotion.hypervisor.cgroups import Cgroups, agent_group
from qmotion.lab import LabInputError, lab_down, lab_up
from qmotion.lab.errors import LabNotFound
from qmotion.lab.netns import links_with_prefix, namespaces, run_in
from qmotion.migration.params import MAX_STREAMS
from qmotion.probe.guest import echo_once, mem_check, wait_echo
from tests.integration.conftest import unique_lab_name, wait_task

pytestmark = pytest.mark.integration


def qemu_pids_with(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], check=False, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_lab_down_leaves_nothing_behind() -> None:
    name = unique_lab_name()
    lab = lab_up(name, 2, rtt_ms=20)
    try:
        spec = VmSpec(
            name="v",
            memory="256M",
            nics=[Nic(mac="52:54:00:7f:00:01")],
            guest=GuestConfig(ip=lab.pool_address(0)),
        )
        groups = [Cgroups.detect(agent_group(h.name, Path(h.state_dir))) for h in lab.record.hosts]
        lab.agent("h1").define(spec)
        lab.agent("h1").start("v")
        ip = lab.pool_address(0).split("/")[0]
        run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
        # The emulated distance is in place between hosts.
        rtt = run_in(lab.host("h1").namespace, lambda: _tcp_rtt(lab.host("h2").address))
        assert 0.019 < rtt < 0.1
        # And the guest on h1 answers across it from the client (half the delay: one egress).
        assert run_in(lab.record.client_namespace, lambda: echo_once(ip)) >= 0.009
        assert qemu_pids_with(str(spec.uuid))
        # A migration across the distance: the RTT is measured and the streams chosen from it
        # (a short probe over a long path cannot see the link: the most streams).
        with lab.server() as server:
            vm = server.create_vm(
                VmCreate.model_validate(
                    {
                        "name": "w",
                        "host": "h1",
                        "memory": "128M",
                        "start": True,
                        "workload": Workload(fill_mib=16),
                        # The pool's first address is v's, which the manager does not know.
                        "address": lab.pool_address(1),
                    }
                )
            )
            assert vm.address is not None
            wip = vm.address.split("/")[0]
            run_in(lab.record.client_namespace, lambda: wait_echo(wip, 90))
            task = wait_task(server, server.migrate("w", MigrateRequest(to="h2")))
            assert task.state == TaskState.SUCCEEDED, task.error
            assert task.result is not None
            assert server.vm("w").host == "h2"
            prediction = task.result.prediction
            assert prediction is not None and prediction.rtt_ms >= 15
            assert task.result.streams == MAX_STREAMS
            moved = server.vm("w").uuid
        # Both QEMUs run as the unprivileged user (the destination read the TLS credentials
        # and its disk as that user to take the stream).
        qemu_uid = str(pwd.getpwnam("qmotion-qemu").pw_uid)
        for uuid in (spec.uuid, moved):
            (pid,) = qemu_pids_with(str(uuid))
            uids = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()]
            assert next(ln for ln in uids if ln.startswith("Uid:")).split()[1:] == [qemu_uid] * 4
            if groups[0] is not None:  # a host whose cgroups the agent may write
                key = str(uuid).replace("-", "")
                assert f"/vm-{key}" in Path(f"/proc/{pid}/cgroup").read_text()
        assert run_in(lab.record.client_namespace, lambda: mem_check(wip))["consistent"]
        lab_dir = Path(lab.record.dir)
    except BaseException:
        lab_down(name)
        raise
    lab_down(name)
    assert not [n for n in namespaces() if n.startswith(f"{name}-")]
    assert not links_with_prefix(f"{name}-")
    assert not qemu_pids_with(str(spec.uuid))
    assert not qemu_pids_with(str(moved))
    assert not lab_dir.exists()
    assert not [b for g in groups if g is not None for b in g.bases.values() if b.exists()]
    assert not list(Path("/run/qmotion").glob(f"{name}-*"))
    with pytest.raises(LabNotFound):
        lab_down(name)


def _tcp_rtt(address: str) -> float:
    import socket

    # The first connection also pays for ARP; the second is one SYN/SYN-ACK round trip.
    socket.create_connection((address, 8100), timeout=5).close()
    start = time.monotonic()
    socket.create_connection((address, 8100), timeout=5).close()
    return time.monotonic() - start


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": 0}, "--hosts"),
        ({"rtt_ms": -1}, "--rtt-ms"),
        ({"bandwidth": "fast"}, "--bandwidth"),
        ({"name": "Bad_Name"}, "lab name"),
    ],
)
def test_bad_lab_arguments_change_nothing(kwargs: dict[str, object], match: str) -> None:
    before = namespaces()
    args: dict[str, object] = {"name": unique_lab_name(), "hosts": 2, **kwargs}
    with pytest.raises(LabInputError, match=match):
        lab_up(**args)  # type: ignore[arg-type]
    assert namespaces() == before
