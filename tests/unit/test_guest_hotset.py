"""The guest's hot-set workload: a small set rewritten constantly besides the page-order sweep,
and the memory checker still catches a lost write to it (qmguest run natively, no VM)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qmotion.api.server import Workload
from qmotion.api.vm import GuestConfig
from qmotion.cli.vm import parse_workload
from qmotion.image.build import GuestImage
from qmotion.image.cc import compile_static
from qmotion.image.errors import ImageInputError
from qmotion.probe.guest import query

FILL_MIB, DIRTY_MIB_S, HOT_MIB = 64, 100, 8
HOT_PAGES = HOT_MIB * 256

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def qmguest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qmguest built exactly as for the image (static), into a private cache, not the shared one."""
    cache = tmp_path_factory.mktemp("cache")
    src = resources.files("qmotion.image").joinpath("guest", "qmguest.c").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QMOTION_CACHE_DIR", str(cache))
        try:
            binary = compile_static("qmguest", src)
        except ImageInputError as exc:  # gcc is not installed
            pytest.skip(str(exc))
    assert binary.is_relative_to(cache)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(port: int, command: str) -> dict[str, Any]:
    return query("127.0.0.1", port, command, timeout_s=10, wait_s=10)


@contextmanager
def run_mem(qmguest: Path, *args: str) -> Iterator[int]:
    """qmguest mem on a free loopback port; the process is killed by PID on the way out."""
    port = free_port()
    proc = subprocess.Popen([str(qmguest), "mem", *args[:2], str(port), *args[2:]])
    try:
        status = ask(port, "status")  # waits (bounded) for the port to open
        assert status["kind"] == "mem"
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def hot_guest(qmguest: Path) -> Iterator[int]:
    """mem FILL DIRTY PORT CHECK_EVERY HOT: 64 MiB, 100 MiB/s, an 8 MiB hot set."""
    with run_mem(qmguest, str(FILL_MIB), str(DIRTY_MIB_S), "0", str(HOT_MIB)) as port:
        yield port


def test_hot_set_rewritten_and_memory_consistent(hot_guest: int) -> None:
    time.sleep(0.3)
    first = ask(hot_guest, "check")
    time.sleep(0.3)
    second = ask(hot_guest, "check")
    status = ask(hot_guest, "status")
    for check in (first, second):
        assert check["consistent"] is True, check
        assert check["bad_pages"] == 0 and check["hot_bad"] == 0
        assert check["pages"] == FILL_MIB * 256
        assert check["hot_mib"] == HOT_MIB and check["hot_pages"] == HOT_PAGES
    # The hot set was rewritten over and over (50 MiB/s over 8 MiB: several passes a second)...
    assert second["hot_pass"] >= first["hot_pass"] + 1
    # ... while the sweep moved over the rest of the fill, never into the hot set.
    assert (second["pass"], second["cursor"]) > (first["pass"], first["cursor"])
    assert HOT_PAGES <= second["cursor"] <= FILL_MIB * 256
    # Half of the dirty budget went to the hot set, half to the sweep.
    assert status["hot_mib"] == HOT_MIB
    assert abs(2 * status["dirtied_hot_pages"] - status["dirtied_pages"]) <= 2


def test_checker_catches_a_lost_hot_write(hot_guest: int) -> None:
    time.sleep(0.3)
    assert ask(hot_guest, "check")["consistent"] is True
    # The injected page is the hot page written last, left alone for a whole hot pass (~160 ms);
    # on a badly overloaded host the dirtier could still get to it first: then inject again.
    for _ in range(3):
        injected = ask(hot_guest, "inject stale-hot")
        assert injected["injected"] == "stale-hot"
        page = injected["page"]
        assert 0 <= page < HOT_PAGES
        result = ask(hot_guest, "check")
        if not result["consistent"]:
            break
    assert result["consistent"] is False, result
    assert result["stale"] >= 1 and result["hot_bad"] >= 1
    assert result["first_bad"] == page
    assert result["torn"] == 0 and result["missing"] == 0


def test_without_hot_set_the_old_argv_still_works(qmguest: Path) -> None:
    # Five arguments, as an older /init passes them: no hot set, the whole rate sweeps.
    with run_mem(qmguest, "4", "20", "0") as port:
        time.sleep(0.2)
        check = ask(port, "check")
        assert check["consistent"] is True and check["hot_mib"] == 0
        assert ask(port, "status")["dirtied_hot_pages"] == 0
        assert "error" in ask(port, "inject stale-hot")


def test_parse_workload_hot() -> None:
    wl = parse_workload("fill=600M,dirty=200M/s,hot=64M")
    assert (wl.fill_mib, wl.dirty_mib_s, wl.hot_mib) == (600, 200.0, 64)
    assert parse_workload("fill=1G,hot=1G").hot_mib == 1024
    assert parse_workload("fill=600M,dirty=20M/s").hot_mib == 0
    assert parse_workload("fill=600M,hot=0").hot_mib == 0


def test_parse_workload_rejects_bad_hot() -> None:
    with pytest.raises(ValidationError, match="hot_mib") as info:
        parse_workload("fill=32M,dirty=20M/s,hot=64M")
    assert info.value.errors()[0]["loc"] == ("hot_mib",)
    assert "fill_mib" in str(info.value)
    with pytest.raises(ValueError, match=r"\(fill, dirty, hot, disk, cpu\)"):
        parse_workload("fill=32M,cold=1M")
    with pytest.raises(ValueError, match="less than 1 MiB"):
        parse_workload("fill=32M,hot=512K")


def test_hot_mib_validated_and_carried_to_the_cmdline() -> None:
    with pytest.raises(ValidationError, match="hot_mib"):
        Workload(fill_mib=8, hot_mib=9)
    with pytest.raises(ValidationError, match="hot_mib"):
        Workload(fill_mib=8, hot_mib=-1)
    with pytest.raises(ValidationError, match="hot_mib"):
        GuestConfig(fill_mib=8, hot_mib=9)
    assert GuestConfig(fill_mib=8, hot_mib=8).hot_mib == 8
    image = GuestImage(kernel=Path("k"), initrd=Path("i"), kernel_release="r", key="x")
    assert "qm.hot=64" in image.cmdline(fill=600, dirty=200.0, hot=64).split()


def test_parse_workload_cpu() -> None:
    assert parse_workload("cpu=80%").cpu_pct == 80.0
    assert parse_workload("fill=8M,cpu=25").cpu_pct == 25.0
    with pytest.raises(ValueError, match="percentage"):
        parse_workload("cpu=lots")
    with pytest.raises(ValidationError, match="cpu_pct"):
        parse_workload("cpu=150%")
