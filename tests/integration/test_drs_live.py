"""DRS on the live lab with real guests: maintenance evacuates and returns six VMs (an
anti-affinity rule kept, a manual move breaking it refused), and full automation balances
measured CPU load, then stops. Every VM's memory is checked and its echo answers after."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qmotion.api.drs import RuleCreate
from qmotion.api.server import VmCreate, Workload
from qmotion.client.errors import ApiError
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.lab.netns import run_in
from qmotion.migration.prechecks import HOST_RESERVED_MIB
from qmotion.probe.guest import mem_check, wait_echo
from tests.integration.conftest import ip_of

pytestmark = pytest.mark.integration


def cli(lab: Lab, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmotion", *args, "--lab", lab.record.name],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def cluster(lab: Lab) -> Iterator[tuple[ServerClient, list[str], list[str]]]:
    """The manager, and lists of VMs and rules the test makes (removed after). VMs other
    tests left running are pinned where they are (a must run-on rule each), so DRS moves only
    this test's VMs; the cluster's settings are restored."""
    vms: list[str] = []
    rules: list[str] = []
    with lab.server() as server:
        saved = server.settings()
        for vm in server.vms():
            name = f"pin-{vm.name}"
            server.create_rule(RuleCreate(name=name, kind="run-on", vms=[vm.name], hosts=[vm.host]))
            rules.append(name)
        try:
            yield server, vms, rules
        finally:
            for host in ("h1", "h2", "h3"):
                with contextlib.suppress(ApiError):
                    server.exit_maintenance(host)
            server.set_settings(
                {
                    "drs.automation": saved.automation.value,
                    "drs.threshold": str(saved.threshold),
                    "drs.interval": f"{saved.interval_s}s",
                    "drs.cooldown": f"{saved.cooldown_s}s",
                }
            )
            for name in rules:
                with contextlib.suppress(ApiError):
                    server.delete_rule(name)
            for name in vms:
                with contextlib.suppress(Exception):
                    server.delete_vm(name, force=True)


def boot(
    lab: Lab, server: ServerClient, made: list[str], host: str, n: int, **wl: float
) -> list[str]:
    names = [f"d{secrets.token_hex(3)}" for _ in range(n)]
    for name in names:
        server.create_vm(
            VmCreate.model_validate(
                {
                    "name": name,
                    "host": host,
                    "memory": "160M",
                    "start": True,
                    "workload": Workload(fill_mib=24, **wl),
                }
            )
        )
        made.append(name)
    for name in names:
        healthy(lab, server, name)
    return names


def healthy(lab: Lab, server: ServerClient, name: str) -> None:
    ip = ip_of(server.vm(name))
    run_in(lab.record.client_namespace, lambda: wait_echo(ip, 120))
    check = run_in(lab.record.client_namespace, lambda: mem_check(ip))
    assert check["consistent"], (name, check)


def placement(server: ServerClient, names: list[str]) -> dict[str, str]:
    return {v.name: v.host for v in server.vms() if v.name in names}


def within_capacity(server: ServerClient) -> None:
    for h in server.hosts():
        assert h.committed_mib <= h.memory_mib - HOST_RESERVED_MIB, h


def test_maintenance_evacuates_six_vms_keeps_rules_and_returns_them(
    lab: Lab, cluster: tuple[ServerClient, list[str], list[str]]
) -> None:
    server, made, rules = cluster
    six = boot(lab, server, made, "h3", 6)
    a, b = six[0], six[1]
    server.create_rule(RuleCreate(name="apart", kind="anti-affinity", vms=[a, b]))
    rules.append("apart")

    began = time.monotonic()
    out = cli(lab, "host", "maintenance", "enter", "h3", "--wait", "--json")
    took = time.monotonic() - began
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)["operation"]
    assert {m["vm"] for m in report["moves"] if m["outcome"] == "moved"} == set(six)
    where = placement(server, six)
    assert set(where.values()) <= {"h1", "h2"}
    counts = [list(where.values()).count(h) for h in ("h1", "h2")]
    # Spread (by load, other tests' pinned VMs included), never all on one host.
    assert min(counts) >= 1, where
    assert where[a] != where[b]  # the anti-affinity rule, kept by the evacuation
    within_capacity(server)
    host = next(h for h in server.hosts() if h.name == "h3")
    assert host.state == "maintenance"
    with pytest.raises(ApiError) as refused:
        server.create_vm(VmCreate.model_validate({"name": "nope", "host": "h3", "memory": "64M"}))
    assert refused.value.status == 409
    # A manual move that breaks the rule is refused, naming it; nothing moves.
    moved = cli(lab, "vm", "migrate", a, "--to", where[b])
    assert moved.returncode != 0 and "apart" in moved.stdout + moved.stderr
    assert placement(server, [a])[a] == where[a]
    for name in six:
        healthy(lab, server, name)

    # Back: all but one of the pair (the rule keeps them apart on return too), which stays
    # where it is, the task saying why.
    back = cli(lab, "host", "maintenance", "exit", "h3", "--return", "--wait", "--json")
    assert back.returncode == 1, back.stdout + back.stderr
    returned = json.loads(back.stdout)["operation"]["moves"]
    left = [m for m in returned if m["outcome"] != "moved"]
    assert len(left) == 1 and left[0]["vm"] in (a, b) and "apart" in left[0]["reason"], left
    after = placement(server, six)
    assert [n for n in six if after[n] != "h3"] == [left[0]["vm"]], after
    for name in six:
        healthy(lab, server, name)
    print(f"evacuation of 6 VMs: {took:.1f} s, spread {counts}")


def test_full_automation_balances_measured_cpu_load_then_stops(
    lab: Lab, cluster: tuple[ServerClient, list[str], list[str]]
) -> None:
    server, made, _ = cluster
    # Two busy guests on one host (each host offers the lab's share of the CPUs).
    busy = boot(lab, server, made, "h1", 2, cpu_pct=50)
    server.set_settings(
        {
            "drs.automation": "full",
            "drs.threshold": "3",
            "drs.interval": "1d",  # the test runs the rounds: no timed round in between
            "drs.cooldown": "1h",  # no ping-pong on measurement noise
        }
    )
    for _ in range(2):  # measured samples (the agent samples every 2 s)
        time.sleep(2.5)
        server.refresh_hosts()
    run = server.drs_run()
    assert run.measured_vms >= 2 and run.applied_task is not None, run
    assert {r.vm for r in run.recommendations} & set(busy), run
    task = server.task(run.applied_task)
    deadline = time.monotonic() + 300
    while task.state.active and time.monotonic() < deadline:
        time.sleep(0.5)
        task = server.task(run.applied_task)
    assert task.state == "succeeded", task.error
    where = placement(server, busy)
    assert len(set(where.values())) == 2, where
    within_capacity(server)
    for _ in range(2):
        time.sleep(2.5)
        server.refresh_hosts()
        again = server.drs_run()
        assert again.recommendations == [] and again.applied_task is None, again
    assert placement(server, busy) == where
    for name in busy:
        healthy(lab, server, name)


@pytest.mark.usefixtures("cluster")  # pins other tests' VMs: the scheduled round moves none
def test_a_schedule_survives_a_manager_restart(lab: Lab) -> None:
    out = cli(lab, "schedule", "create", "--at", "+4s", "--drs", "--name", "nightly", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    sid = json.loads(out.stdout)["id"]
    # Down past the due time: the new manager finds the run missed, within its grace.
    lab.restart_manager(down_s=5)
    with lab.server() as fresh:
        deadline = time.monotonic() + 60
        runs = fresh.schedule(sid).runs
        while not runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = fresh.schedule(sid).runs
        assert runs and runs[0].outcome == "started", runs
        assert runs[0].task_id is not None
        assert fresh.task(runs[0].task_id).kind == "drs-apply"
        assert fresh.schedule(sid).next_run_at is None  # a one-off: done
        fresh.delete_schedule(sid)
