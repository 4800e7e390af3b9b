"""DRS on the live manager's inventory: `qmotion drs plan/place --manager` against the lab."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from qmotion.api.server import VmCreate
from qmotion.client.server import ServerClient
from qmotion.drs.inventory import snapshot_from_inventory
from qmotion.lab import Lab
from qmotion.migration.prechecks import HOST_RESERVED_MIB

pytestmark = pytest.mark.integration


@pytest.fixture
def server(lab: Lab) -> Iterator[ServerClient]:
    with lab.server() as client:
        yield client


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmotion", "drs", *args, "--manager", "--lab", lab.record.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plan_and_place_on_the_manager_inventory(lab: Lab, server: ServerClient) -> None:
    names = [f"d{secrets.token_hex(3)}" for _ in range(2)]
    try:
        for name in names:
            server.create_vm(
                VmCreate.model_validate(
                    {"name": name, "host": "h2", "memory": "256M", "start": False}
                )
            )
        snap = snapshot_from_inventory(server.hosts(), server.vms())
        facts = {h.name: h.facts for h in server.hosts()}
        assert {h.name for h in snap.hosts} == {"h1", "h2", "h3"}
        for h in snap.hosts:
            f = facts[h.name]
            assert f is not None
            # The pre-checks' capacity: the host's reservation is not DRS's to give.
            assert (h.cpu_capacity, h.memory_mib) == (
                f.cpus,
                (f.memory_bytes >> 20) - HOST_RESERVED_MIB,
            )
        assert {v.name: v.host for v in snap.vms if v.name in names} == dict.fromkeys(names, "h2")

        planned = cli(lab, "plan", "--json", "--threshold", "5")
        assert planned.returncode == 0, planned.stderr
        result = json.loads(planned.stdout)
        assert result["imbalance_after"] <= result["imbalance_before"]
        # Planning is read only: the VMs are where they were.
        assert {v.name: v.host for v in server.vms() if v.name in names} == dict.fromkeys(
            names, "h2"
        )

        big = facts["h1"].memory_bytes >> 20  # type: ignore[union-attr]
        placed = cli(lab, "place", "--json", "--vm", json.dumps({"name": "n", "memory_mib": 512}))
        assert placed.returncode == 0, placed.stderr
        ranked = json.loads(placed.stdout)
        assert {c["host"] for c in ranked} == {"h1", "h2", "h3"}
        assert all(c["feasible"] for c in ranked)
        # The host already holding memory ranks last for a new VM.
        assert ranked[-1]["host"] == "h2"
        too_big = json.dumps({"name": "n", "memory_mib": big * 2})
        refused = json.loads(cli(lab, "place", "--json", "--vm", too_big).stdout)
        assert not any(c["feasible"] for c in refused)
    finally:
        for name in names:
            server.delete_vm(name, force=True)
