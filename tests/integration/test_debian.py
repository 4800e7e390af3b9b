"""A real Debian 12 guest: built from packages (`image build debian`), imported, created with
its cloud-init seed, it names itself and takes its pool address by MAC, runs a TCP service, and
keeps serving the same open connection through a shared-nothing live migration."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from qmotion.api.server import DiskCreate, ImageImport, MigrateRequest, TaskState, VmCreate
from qmotion.api.vm import VmState
from qmotion.client.server import ServerClient
from qmotion.image.debian import ECHO_SERVICE, ensure_debian
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.probe.guest import ECHO_PORT, wait_echo

from .conftest import wait_task
from .test_cold import defined_on
from .test_storage import ds_path


@pytest.fixture(scope="session")
def debian_image() -> Path:
    return ensure_debian()


def _session(address: str, stop: threading.Event, out: dict[str, object]) -> None:
    """One TCP connection, a numbered message every 20 ms, each echoed back in order."""
    gaps, n = [], 0
    with socket.create_connection((address, ECHO_PORT), timeout=30) as s:
        last = time.monotonic()
        while not stop.is_set():
            msg = f"{n:08d}\n".encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(len(msg) - len(got))
                if not chunk:
                    raise ConnectionError("the guest closed the connection")
                got += chunk
            if got != msg:
                raise AssertionError(f"sent {msg!r}, got {got!r}")
            now = time.monotonic()
            gaps.append(now - last)
            last, n = now, n + 1
            time.sleep(0.02)
    out["messages"], out["max_gap_s"] = n, max(gaps, default=0.0)


def test_a_debian_guest_from_its_image_moves_shared_nothing_with_its_service_running(
    lab: Lab, server: ServerClient, debian_image: Path
) -> None:
    image = server.import_image(ImageImport(file=str(debian_image), name="debian12"))
    vm = server.create_vm(
        VmCreate(
            name="deb",
            host="h1",
            memory="512M",
            image="debian12",
            disk=DiskCreate(datastore="local-h1", size_mib=3072),
            user_data=ECHO_SERVICE,
            start=True,
        )
    )
    try:
        assert vm.address is not None
        ip = vm.address.split("/")[0]
        ns = lab.record.client_namespace
        # Booted, named itself from the seed, took its address by MAC, started its service.
        run_in(ns, lambda: wait_echo(ip, 240))
        assert "deb login:" in lab.agent("h1").console("deb")
        stop, result = threading.Event(), dict[str, object]()
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                run_in(ns, lambda: _session(ip, stop, result))
            except BaseException as exc:
                errors.append(exc)

        session = threading.Thread(target=hold)
        session.start()
        time.sleep(1)
        try:
            task = wait_task(
                server,
                server.migrate("deb", MigrateRequest(to="h2", datastore="local-h2")),
                timeout_s=300,
            )
            time.sleep(1)
        finally:
            stop.set()
            session.join(60)
        assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
        # The same TCP connection carried on, in order, through the move.
        assert errors == [] and int(str(result["messages"])) > 50, (errors, result)
        moved = server.vm("deb")
        assert moved.host == "h2" and moved.state == VmState.RUNNING
        assert defined_on(lab, "deb") == ["h2"]
        assert [d.datastore for d in moved.disks] == ["local-h2"]
        assert not list(ds_path(lab, "local-h1").glob("deb/*"))
        run_in(ns, lambda: wait_echo(ip, 30))
    finally:
        server.delete_vm("deb", force=True)
    assert image.virtual_size >= 2 << 30
