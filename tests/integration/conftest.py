"""Integration fixtures: a real lab (namespaces, agents, TCG guests) torn down on any outcome."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmotion.api.server import TaskOut, VmCreate, VmOut, Workload
from qmotion.api.vm import GuestConfig, Nic, VmInfo, VmSpec
from qmotion.client.server import ServerClient
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import run_in
from qmotion.probe.guest import mem_check, wait_echo

pytestmark = pytest.mark.integration


def unique_lab_name() -> str:
    return "qt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (network namespaces, taps)")
    name = unique_lab_name()
    # Migration streams on their own network, as an operator would run them.
    the_lab = lab_up(name, 3, migration_net=True, small_datastore_mib=64)
    try:
        yield the_lab
    finally:
        lab_down(name)


_counter = iter(range(10_000))


def mac_for(index: int) -> str:
    return f"52:54:00:7e:{index >> 8:02x}:{index & 0xFF:02x}"


@pytest.fixture
def boot_vm(lab: Lab) -> Iterator[Callable[..., tuple[VmInfo, str]]]:
    """Define and start a built guest on a host; waits until it answers echo from the client.

    Every VM it made is force-deleted afterwards, pass or fail.
    """
    made: list[tuple[str, str]] = []

    def boot(
        host: str, *, memory: str = "256M", fill_mib: int = 32, dirty_mib_s: float = 0, **extra: Any
    ) -> tuple[VmInfo, str]:
        n = next(_counter)
        name = f"t{n}-{secrets.token_hex(2)}"
        address = lab.pool_address(n)
        spec = VmSpec(
            name=name,
            memory=memory,
            nics=[Nic(mac=mac_for(n))],
            guest=GuestConfig(ip=address, fill_mib=fill_mib, dirty_mib_s=dirty_mib_s),
            **extra,
        )
        agent = lab.agent(host)
        agent.define(spec)
        made.append((host, name))
        info = agent.start(name)
        ip = address.split("/")[0]
        run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
        return info, ip

    yield boot
    for host, name in made:
        agent = lab.agent(host)
        # Cleanup must go on for the other VMs whatever this one's state.
        with contextlib.suppress(Exception):
            agent.delete(name, force=True)


LOG_TAIL_CHARS = 6000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed lab test's report carries the tail of every agent's, the manager's and each
    QEMU's log, read before teardown deletes them: a failure seen once in CI is then readable."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if call.when != "call" or not report.failed:
        return
    the_lab = getattr(item, "funcargs", {}).get("lab")
    if not isinstance(the_lab, Lab):
        return
    for log in sorted(Path(the_lab.record.dir).rglob("*.log")):
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            report.sections.append((f"lab log {log.relative_to(the_lab.record.dir)}", text))


MakeVm = Callable[..., VmOut]


@pytest.fixture
def server(lab: Lab) -> Iterator[ServerClient]:
    with lab.server() as client:
        yield client


@pytest.fixture
def make_vm(lab: Lab, server: ServerClient) -> Iterator[MakeVm]:
    made: list[str] = []

    def make(
        host: str = "h1",
        memory: str = "256M",
        fill: int = 32,
        dirty: float = 0,
        start: bool = True,
        **extra: object,
    ) -> VmOut:
        name = f"m{secrets.token_hex(3)}"
        vm = server.create_vm(
            VmCreate.model_validate(
                {
                    "name": name,
                    "host": host,
                    "memory": memory,
                    "start": start,
                    "workload": Workload(fill_mib=fill, dirty_mib_s=dirty),
                    **extra,
                }
            )
        )
        made.append(name)
        if start:
            ip = ip_of(vm)
            run_in(lab.record.client_namespace, lambda: wait_echo(ip, 90))
            # The check waits for the initial fill; after it the guest is fully up.
            assert run_in(lab.record.client_namespace, lambda: mem_check(ip))["consistent"]
        return vm

    yield make
    for name in made:
        # Keep cleaning the others whatever this one's state.
        with contextlib.suppress(Exception):
            server.delete_vm(name, force=True)


def ip_of(vm: VmOut) -> str:
    assert vm.address is not None
    return vm.address.split("/")[0]


def wait_task(server: ServerClient, task: TaskOut, timeout_s: float = 120) -> TaskOut:
    deadline = time.monotonic() + timeout_s
    while task.state.active:
        assert time.monotonic() < deadline, f"task {task.id} still {task.state}: " + "; ".join(
            f"{e.at:%H:%M:%S.%f} {e.message}" for e in task.events
        )
        time.sleep(0.1)
        task = server.task(task.id)
    return task
