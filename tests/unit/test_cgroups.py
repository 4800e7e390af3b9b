"""Each QEMU in a cgroup of its own: the limits are the kernel's to enforce (real hierarchy,
real processes); a VM's group goes with its QEMU."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.hypervisor.cgroups import Cgroups, Limits, agent_group, limits_for

MIB = 1 << 20


@pytest.fixture
def groups(tmp_path: Path) -> Iterator[Cgroups]:
    found = Cgroups.detect(agent_group(f"test-{uuid.uuid4().hex[:6]}", tmp_path))
    if found is None:
        pytest.skip("no writable cgroup hierarchy with cpu, memory and pids here")
    yield found
    found.remove_all()
    assert not any(b.exists() for b in found.bases.values())


def _child(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def test_limits_follow_the_vm_size() -> None:
    small, big = limits_for(1, 256, "kvm"), limits_for(4, 4096, "kvm")
    assert big.cpu_weight == 4 * small.cpu_weight
    assert small.memory_max > 256 * MIB and big.memory_max > 4096 * MIB
    # QEMU's overhead, and under TCG its code cache, are room beyond the guest's RAM.
    assert limits_for(1, 256, "tcg").memory_max >= small.memory_max + 1024 * MIB


def test_a_process_over_its_memory_limit_is_killed_alone(groups: Cgroups) -> None:
    """What a runaway QEMU meets: its group's limit, not the host's OOM killer."""
    hog = _child(
        "import sys; sys.stdin.read(1); b = bytearray(96 << 20)\n"
        "b[::4096] = b'x' * (len(b) // 4096); sys.stdin.read()"
    )
    bystander = _child("import sys; sys.stdin.read()")
    try:
        groups.place("hog", hog.pid, Limits(cpu_weight=100, memory_max=48 * MIB, pids_max=64))
        # Another VM's group, as small: its QEMU is not the one killed.
        groups.place("by", bystander.pid, Limits(cpu_weight=100, memory_max=48 * MIB, pids_max=64))
        where = groups.where(hog.pid)
        key = "memory" if groups.version == 1 else ""
        assert where[key].endswith("/vm-hog")
        assert hog.stdin is not None
        hog.stdin.write(b"go")
        hog.stdin.flush()
        assert hog.wait(30) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (hog, bystander):
            p.kill()
            p.wait()
    groups.remove("hog")
    groups.remove("by")
    assert not any((b / "vm-hog").exists() for b in groups.bases.values())


def test_a_group_cannot_grow_past_its_task_limit(groups: Cgroups) -> None:
    parent = _child(
        "import subprocess, sys; sys.stdin.read(1); n = 0\n"
        "procs = []\n"
        "try:\n"
        "    for _ in range(20): procs.append(subprocess.Popen(['sleep', '30'])); n += 1\n"
        "except OSError: pass\n"
        "print(n, flush=True)\n"
        "[p.kill() for p in procs]\n"
    )
    try:
        groups.place("forky", parent.pid, Limits(cpu_weight=100, memory_max=512 * MIB, pids_max=5))
        assert parent.stdin is not None
        parent.stdin.write(b"g")
        parent.stdin.close()
        assert parent.stdout is not None
        started = int(parent.stdout.read().split()[0])
        assert parent.wait(30) == 0
        assert started == 4  # five tasks: itself and four children
    finally:
        parent.kill()
        parent.wait()
    groups.remove("forky")


def test_a_group_reused_by_a_vm_that_changed_size_takes_its_new_limits(
    groups: Cgroups,
) -> None:
    """v1 refuses a memory limit above memory+swap's, and memory+swap below memory's: a VM
    started again after growing or shrinking must still start."""
    child = _child("import sys; sys.stdin.read()")
    try:
        for mib in (256, 64, 1024):
            groups.place("sized", child.pid, limits_for(1, mib, "kvm"))
            vm = groups.bases["memory"] / "vm-sized"
            name = "memory.limit_in_bytes" if groups.version == 1 else "memory.max"
            assert int((vm / name).read_text()) == limits_for(1, mib, "kvm").memory_max
    finally:
        child.kill()
        child.wait()
    groups.remove("sized")


def test_cpu_weight_is_set_by_vcpus(groups: Cgroups) -> None:
    child = _child("import sys; sys.stdin.read()")
    try:
        groups.place("w", child.pid, limits_for(3, 128, "kvm"))
        if groups.version == 1:
            assert (groups.bases["cpu"] / "vm-w" / "cpu.shares").read_text().strip() == "3072"
        else:
            assert (groups.bases["cpu"] / "vm-w" / "cpu.weight").read_text().strip() == "300"
    finally:
        child.kill()
        child.wait()


def test_an_upgraded_agent_puts_the_vms_it_finds_running_in_their_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMUs started by an agent without cgroups (an older one) get theirs when the agent
    restarts with them; a VM stopped afterwards leaves no group behind."""
    import asyncio

    from tests.unit.migrating_qemu import cluster_at

    found: list[Cgroups] = []
    with cluster_at(tmp_path, monkeypatch) as cluster:

        async def run() -> None:
            old, _ = await cluster.host("h1")
            assert old.cgroups is None
            await old.define(cluster.spec())
            await old.start("vm1")
            pid = old._runtime["vm1"].pid
            new, _ = await cluster.host("h1", cgroups=True)
            if new.cgroups is None:
                pytest.skip("no writable cgroup hierarchy here")
            found.append(new.cgroups)
            key = new.spec("vm1").uuid.hex
            where = new.cgroups.where(pid)
            assert where["memory" if new.cgroups.version == 1 else ""].endswith(f"/vm-{key}")
            await new.stop("vm1", force=True)
            assert not any((b / f"vm-{key}").exists() for b in new.cgroups.bases.values())

        try:
            asyncio.run(run())
        finally:
            cluster.close()  # its QEMUs gone first: their groups can go
            for groups in found:
                groups.remove_all()
