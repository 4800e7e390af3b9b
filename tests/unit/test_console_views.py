"""The console's view models: host states, bars, the VM search and error lines. Pure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from qmotion.api.errors import ErrorDetail, describe
from qmotion.api.host import AccelInfo, Datastore, HostFacts
from qmotion.api.server import HostOut, VmOut
from qmotion.api.storage import DiskUsage
from qmotion.drs.model import HostSpec, Snapshot, VmSpec
from qmotion.server.console import views


def facts(health: str = "ok", reasons: tuple[str, ...] = ()) -> HostFacts:
    return HostFacts(
        name="h",
        cpu_model="qemu64",
        cpu_flags=[],
        cpus=4,
        memory_bytes=8 << 30,
        qemu_version="10.0.2",
        machine_types=["pc"],
        cpu_models=["qemu64"],
        accel=AccelInfo(name="tcg", reason="probe"),
        bridges=["br0"],
        datastores=[Datastore(name="shared", path="/s", shared=True)],
        agent_version="0.1.0",
        health=health,
        health_reasons=list(reasons),
    )


def host(name: str, state: str = "up", **kw: Any) -> HostOut:
    return HostOut(
        name=name,
        agent_url=f"https://{name}:8100",
        state=state,
        last_seen=datetime.now(UTC),
        vms=kw.pop("vms", []),
        memory_mib=8192,
        committed_mib=kw.pop("committed", 0),
        facts=kw.pop("facts", facts()),
        **kw,
    )


def vm(name: str, host: str, **kw: Any) -> VmOut:
    return VmOut(
        name=name,
        uuid="0" * 32,
        host=host,
        state=kw.pop("state", "running"),
        mac=kw.pop("mac", "52:54:00:00:00:01"),
        address=kw.pop("address", None),
        cpu_model="qemu64",
        machine="pc",
        memory_mib=512,
        vcpus=1,
        **kw,
    )


def test_host_states_an_operator_reads_with_why() -> None:
    assert views.host_state(host("a")) == ("up", None)
    assert views.host_state(host("a", "down")) == ("down", None)
    sick = host("a", facts=facts("degraded", ("bridge br0 is down",)))
    assert views.host_state(sick) == ("degraded", "bridge br0 is down")
    # Maintenance wins over health: the operator put it there.
    m = host("a", "maintenance", facts=facts("degraded"), maintenance_reason="2 VMs stay")
    assert views.host_state(m) == ("maintenance", "2 VMs stay")
    assert views.host_state(host("a", "entering-maintenance"))[0] == "entering-maintenance"
    # Down and degraded: down (no word from it is current).
    assert views.host_state(host("a", "down", facts=facts("degraded")))[0] == "down"


def test_bars_show_allocated_and_measured_apart() -> None:
    snap = Snapshot(
        hosts=[HostSpec(name="a", cpu_capacity=4, memory_mib=8192)],
        vms=[
            VmSpec(
                name="x", host="a", memory_mib=4096, vcpus=6, cpu_demand=1.0, memory_demand_mib=1024
            ),
            VmSpec(name="y", host="a", memory_mib=2048, vcpus=2),
        ],
    )
    row = views.host_rows([host("a", committed=6144)], snap)[0]
    assert row.cpu.allocated == 2.0 and row.cpu.allocated_pct == 100  # overcommitted, capped
    assert row.cpu.measured == 0.25
    assert row.memory.allocated == 0.75 and row.memory.measured == 0.125
    assert "8 vCPUs on 4 CPUs" in row.cpu.text and "6144 of 8192 MiB" in row.memory.text
    # Nothing measured yet: no measured bar, not a zero one.
    bare = views.host_rows([host("b")], Snapshot(hosts=[]))[0]
    assert bare.cpu.measured is None and bare.memory.measured is None


@given(st.lists(st.sampled_from(["web", "db", "h1", "h2", "shared", "198.18", "RUN"]), max_size=3))
def test_search_keeps_exactly_the_vms_matching_every_word(words: list[str]) -> None:
    vms = [
        vm("web1", "h1", address="198.18.1.10/24"),
        vm("db1", "h2", disks=[DiskUsage(index=0, datastore="shared", path="d", format="qcow2")]),
        vm("web2", "h2", state="stopped"),
    ]
    got = views.vm_rows(vms, " ".join(words))
    for v in vms:
        text = " ".join(
            [v.name, v.host, str(v.state), v.address or "", v.mac, *views.vm_datastores(v)]
        ).lower()
        assert (v in got) == all(w.lower() in text for w in words)


def test_errors_read_as_the_cli_prints_them() -> None:
    d = ErrorDetail(code="rule_violation", message="no", vm="web1", host="h2", field="to")
    assert describe(d) == "no (vm=web1, host=h2, field=to) [rule_violation]"
    assert describe(ErrorDetail(code="x", message="m")) == "m [x]"
