"""Integration fixtures: a real lab (namespaces, agents, TCG guests) torn down on any outcome."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qmotion.api.vm import GuestConfig, Nic, VmInfo, VmSpec
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import run_in
from qmotion.probe.guest import wait_echo

pytestmark = pytest.mark.integration


def unique_lab_name() -> str:
    return "qt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (network namespaces, taps)")
    name = unique_lab_name()
    # Migration streams on their own network, as an operator would run them.
    the_lab = lab_up(name, 3, migration_net=True)
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
