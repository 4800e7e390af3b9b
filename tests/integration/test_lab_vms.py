"""A lab with three hosts; real TCG guests run through host agents and answer from the client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from qmotion.api.vm import Disk, VmInfo, VmState
from qmotion.client import Conflict
from qmotion.hypervisor.process import is_qemu_of
from qmotion.lab import Lab, LabExists, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.probe.guest import disk_verify, echo_once, mem_check, mem_status

pytestmark = pytest.mark.integration
Boot = Callable[..., tuple[VmInfo, str]]


def in_client(lab: Lab, fn: Callable[[], object]) -> object:
    return run_in(lab.record.client_namespace, fn)


def test_vm_on_host2_answers_echo_with_intact_memory(lab: Lab, boot_vm: Boot) -> None:
    info, ip = boot_vm("h2", fill_mib=64, dirty_mib_s=5)
    assert info.state == VmState.RUNNING
    assert info.host == "h2"
    result = in_client(lab, lambda: mem_check(ip))
    assert isinstance(result, dict)
    assert result["consistent"] is True
    assert result["pages"] == 64 * 256
    # The guest's NIC carries the MAC from the spec (it is what moves with the VM later).
    console = lab.agent("h2").console(info.name)
    assert f"mac={info.spec.nics[0].mac}" in console
    # The VM lives in h2's namespace: h1's agent does not know it.
    assert info.name not in [v.name for v in lab.agent("h1").list_vms()]


def test_host_facts_and_metrics(lab: Lab, boot_vm: Boot) -> None:
    info, _ = boot_vm("h3")
    facts = lab.agent("h3").host()
    assert facts.name == "h3"
    assert facts.accel.name in ("kvm", "tcg")
    assert facts.accel.reason
    assert "vmbr0" in facts.bridges
    assert {d.name for d in facts.datastores} == {"shared", "local-h3", "small"}
    assert any(m.startswith("pc-i440fx-") for m in facts.machine_types)
    time.sleep(2.5)  # two sampler ticks, so the VM has a CPU rate
    metrics = lab.agent("h3").metrics()
    vm = next(v for v in metrics.vms if v.name == info.name)
    assert vm.rss_bytes > 32 << 20  # the guest filled 32 MiB
    assert metrics.memory_total_bytes > 0


def test_agent_restart_keeps_vm_running(lab: Lab, boot_vm: Boot) -> None:
    info, ip = boot_vm("h1", dirty_mib_s=2)
    before = in_client(lab, lambda: mem_status(ip))
    assert isinstance(before, dict)
    lab.restart_agent("h1")
    again = lab.agent("h1").vm(info.name)
    assert again.state == VmState.RUNNING
    assert again.pid == info.pid
    after = in_client(lab, lambda: mem_status(ip))
    assert isinstance(after, dict)
    # Same boot of the guest, and it kept running (its clock and its dirtier moved on).
    assert after["boot_id"] == before["boot_id"]
    assert after["uptime_s"] > before["uptime_s"]
    assert after["dirtied_pages"] > before["dirtied_pages"]
    # The re-attached agent still controls it.
    stopped = lab.agent("h1").stop(info.name, timeout_s=30)
    assert stopped.state == "stopped"


def test_refusals_change_nothing(lab: Lab, boot_vm: Boot) -> None:
    info, ip = boot_vm("h2")
    agent = lab.agent("h2")
    with pytest.raises(Conflict, match="already running"):
        agent.start(info.name)
    with pytest.raises(Conflict, match="running"):
        agent.delete(info.name)
    after = agent.vm(info.name)
    assert after.state == VmState.RUNNING
    assert after.pid == info.pid
    assert in_client(lab, lambda: echo_once(ip)) is not None


def test_graceful_stop_then_delete(lab: Lab, boot_vm: Boot) -> None:
    info, _ = boot_vm("h3")
    agent = lab.agent("h3")
    stopped = agent.stop(info.name, timeout_s=30)
    assert stopped.state == "stopped"
    assert stopped.pid is None
    # Graceful means the guest saw the power button, not that QEMU was killed.
    assert "power button pressed" in agent.console(info.name)
    assert info.pid is not None
    assert not is_qemu_of(info.pid, info.uuid)
    links = subprocess.run(
        ["ip", "-n", lab.host("h3").namespace, "-br", "link"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert info.taps[0] not in links
    agent.delete(info.name)
    assert info.name not in [v.name for v in agent.list_vms()]


def test_disk_writer_on_shared_datastore(lab: Lab, boot_vm: Boot) -> None:
    disk = Disk(datastore="shared", path="tdisk.qcow2", format="qcow2", create_size=64 << 20)
    _, ip = boot_vm("h1", disks=[disk])
    time.sleep(1.0)
    result = in_client(lab, lambda: disk_verify(ip))
    assert isinstance(result, dict)
    assert result["intact"] is True
    assert result["acked"] > 0


def test_second_lab_with_same_name_refused(lab: Lab) -> None:
    before = namespaces()
    with pytest.raises(LabExists, match="already up"):
        lab_up(lab.record.name, 2)
    assert namespaces() == before
    assert lab.agent("h1").host().name == "h1"


def test_cli_status_and_exec(lab: Lab, boot_vm: Boot) -> None:
    _, ip = boot_vm("h2")
    name = lab.record.name
    out = subprocess.run(
        [sys.executable, "-m", "qmotion", "lab", "status", "--name", name, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    status = json.loads(out)
    assert [h["name"] for h in status["hosts"]] == ["h1", "h2", "h3"]
    assert status["client"]["namespace"] == f"{name}-client"
    assert status["address_pool"]["first"].startswith("198.18.")
    assert {d["name"] for d in status["datastores"]} >= {"shared", "local-h1"}
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmotion",
            "lab",
            "exec",
            "--name",
            name,
            "client",
            "--",
            sys.executable,
            "-m",
            "qmotion",
            "probe",
            "echo",
            ip,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["ok"] is True
