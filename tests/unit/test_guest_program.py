"""The guest's memory and disk checkers catch what they claim to (run natively, no VM)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from qmotion.probe.guest import query


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def qmguest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = resources.files("qmotion.image").joinpath("guest", "qmguest.c").read_bytes()
    d = tmp_path_factory.mktemp("qmguest")
    (d / "qmguest.c").write_bytes(src)
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Werror",
            "-pthread",
            "-o",
            str(d / "qmguest"),
            str(d / "qmguest.c"),
        ],
        check=True,
    )
    return d / "qmguest"


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture
def mem_guest(qmguest: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([str(qmguest), "mem", "16", "40", str(port), "0"])
    try:
        wait_port(port)
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_memory_consistent_while_dirtying(mem_guest: int) -> None:
    time.sleep(0.3)
    first = query("127.0.0.1", mem_guest, "check")
    time.sleep(0.3)
    second = query("127.0.0.1", mem_guest, "check")
    assert first["consistent"] and second["consistent"]
    assert first["pages"] == 16 * 256
    # The dirtier made progress between checks: the verdict is about moving memory.
    assert (second["pass"], second["cursor"]) > (first["pass"], first["cursor"])


@pytest.mark.parametrize(("fault", "counter"), [("torn", "torn"), ("stale", "stale")])
def test_memory_checker_detects_faults(mem_guest: int, fault: str, counter: str) -> None:
    time.sleep(0.2)
    assert query("127.0.0.1", mem_guest, f"inject {fault}")["injected"] == fault
    result = query("127.0.0.1", mem_guest, "check")
    # The dirtier may rewrite the damaged page before the check; retry with a fresh fault.
    if result["consistent"]:
        query("127.0.0.1", mem_guest, f"inject {fault}")
        result = query("127.0.0.1", mem_guest, "check")
    assert not result["consistent"]
    assert result[counter] >= 1


def test_disk_records_verify_and_detect_loss(qmguest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    port = free_port()
    proc = subprocess.Popen([str(qmguest), "disk", str(disk), "200", str(port)])
    try:
        wait_port(port)
        time.sleep(0.5)
        ok = query("127.0.0.1", port, "verify")
        assert ok["intact"] and ok["acked"] > 10
        assert query("127.0.0.1", port, "inject lost")["ok"]
        bad = query("127.0.0.1", port, "verify")
        assert not bad["intact"] and bad["lost"] == 1
    finally:
        proc.kill()
        proc.wait()
    # A restarted writer resumes after the newest record instead of starting over.
    port = free_port()
    proc = subprocess.Popen([str(qmguest), "disk", str(disk), "200", str(port)])
    try:
        wait_port(port)
        status = query("127.0.0.1", port, "status")
        assert status["first"] > bad["acked"]
    finally:
        proc.kill()
        proc.wait()


def test_disk_bulk_load_writes_the_second_half_and_spares_the_records(
    qmguest: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (8 << 20))
    port = free_port()
    # 200 records/s plus 8 MiB/s of bulk writes.
    proc = subprocess.Popen([str(qmguest), "disk", str(disk), "200", str(port), "8"])
    try:
        wait_port(port)
        time.sleep(1.0)
        status = query("127.0.0.1", port, "status")
        assert status["slots"] == 1024  # the first 4 MiB of the 8
        assert status["bulk_bytes"] >= 4 << 20, status  # ~8 MiB/s for a second
        ok = query("127.0.0.1", port, "verify")
        assert ok["intact"] and ok["acked"] > 10, ok
    finally:
        proc.kill()
        proc.wait()
    data = disk.read_bytes()
    half = len(data) // 2
    assert data[half:] != b"\0" * half, "the bulk writer wrote nothing"
    # Records only in the first half: the bulk data never looks like a record's magic.
    assert data[:half].count(b"\0" * 4096) < 1024


@pytest.mark.parametrize("percent", [25, 75])
def test_cpu_mode_keeps_that_share_of_a_cpu_busy(qmguest: Path, percent: int) -> None:
    """``qmguest cpu P``: the CPU demand a test guest shows its host (``--workload cpu=P%``)."""
    import resource
    import subprocess
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([str(qmguest), "cpu", str(percent)])
    began = time.monotonic()
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    share = 100 * used / wall
    # Wide: the other core's load skews a 1.5 s sample, but 25% and 75% stay apart.
    assert percent - 20 < share < percent + 15, share
