"""The manager's inventory as a DRS snapshot: host states and VM states become what DRS plans on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qmotion.api.drs import RuleCreate
from qmotion.api.host import AccelInfo, HostFacts
from qmotion.api.server import HostOut, VmOut
from qmotion.drs.inventory import snapshot_from_inventory
from qmotion.drs.model import Policy, Rule
from qmotion.drs.planner import plan
from qmotion.drs.rules import validate
from qmotion.migration.prechecks import HOST_RESERVED_MIB

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def host(
    name: str, state: str = "up", cpus: int = 8, mib: int = 32768, facts: bool = True
) -> HostOut:
    return HostOut(
        name=name,
        agent_url=f"http://{name}",
        state=state,
        last_seen=None,
        vms=[],
        memory_mib=mib if facts else 0,
        committed_mib=0,
        facts=HostFacts(
            name=name,
            cpu_model="qemu64",
            cpu_flags=[],
            cpus=cpus,
            memory_bytes=mib << 20,
            qemu_version="7.2",
            machine_types=["pc-i440fx-7.2"],
            cpu_models=["qemu64"],
            accel=AccelInfo(name="tcg", reason="test"),
            bridges=["vmbr0"],
            datastores=[],
            agent_version="0",
        )
        if facts
        else None,
    )


def vm(
    name: str,
    on: str,
    mib: int = 2048,
    vcpus: int = 2,
    state: str = "running",
    migrating: bool = False,
) -> VmOut:
    return VmOut(
        name=name,
        uuid=name,
        host=on,
        state=state,
        mac="52:54:00:00:00:01",
        address=None,
        cpu_model="qemu64",
        machine="pc",
        memory_mib=mib,
        vcpus=vcpus,
        migrating=migrating,
    )


def test_maintenance_host_is_emptied_across_the_others() -> None:
    hosts = [host("h1", "maintenance"), host("h2"), host("h3")]
    vms = [vm(f"v{i}", "h1") for i in range(6)]
    result = plan(snapshot_from_inventory(hosts, vms), Policy(threshold=1), NOW)
    assert all(m.priority == 1 and m.source == "h1" for m in result.moves)
    assert {result.placement[v.name] for v in vms} == {"h2", "h3"}


def test_down_host_and_host_without_facts_are_evacuated_and_never_targets() -> None:
    hosts = [host("h1", "down"), host("h2", facts=False), host("h3"), host("h4")]
    vms = [vm("a", "h1"), vm("b", "h2"), vm("c", "h3"), vm("d", "h3"), vm("e", "h3")]
    snap = snapshot_from_inventory(hosts, vms)
    result = plan(snap, Policy(threshold=5), NOW)
    assert {result.placement[v] for v in ("a", "b")} <= {"h3", "h4"}
    assert not any(m.target in ("h1", "h2") for m in result.moves)


def test_migrating_vm_is_left_where_it_is_and_stopped_vm_weighs_only_memory() -> None:
    hosts = [host("h1"), host("h2")]
    vms = [
        vm("busy1", "h1", vcpus=4),
        vm("busy2", "h1", vcpus=4, migrating=True),
        vm("off", "h1", mib=8192, vcpus=8, state="stopped"),
    ]
    snap = snapshot_from_inventory(hosts, vms)
    off = next(v for v in snap.vms if v.name == "off")
    assert (off.cpu, off.mem_demand, off.memory_mib) == (0.0, 0.0, 8192)
    result = plan(snap, Policy(threshold=5), NOW)
    assert result.placement["busy2"] == "h1"
    assert result.placement["busy1"] == "h2"  # CPU demand of 8 vCPUs on one host is spread


def test_capacities_come_from_facts() -> None:
    snap = snapshot_from_inventory([host("h1", cpus=16, mib=65536)], [vm("a", "h1")])
    (h,) = snap.hosts
    # The pre-checks' capacity: the host's reservation is not DRS's to give away.
    assert (h.cpu_capacity, h.memory_mib, h.health.value, h.maintenance) == (
        16,
        65536 - HOST_RESERVED_MIB,
        "ok",
        False,
    )


def test_migrations_under_way_take_their_destination_memory() -> None:
    h2 = host("h2", mib=8192).model_copy(update={"committed_mib": 4096})  # one VM incoming
    snap = snapshot_from_inventory([host("h1"), h2], [vm("a", "h1", migrating=True)])
    assert {h.name: h.memory_mib for h in snap.hosts}["h2"] == 8192 - HOST_RESERVED_MIB - 4096


def test_measured_demand_pins_and_rules_for_missing_vms() -> None:
    vms = [vm("a", "h1"), vm("b", "h2"), vm("c", "h1", state="stopped")]
    rules = [
        Rule(name="apart", kind="anti_affinity", vms=["a", "b", "ghost"]),
        Rule(name="pair", kind="affinity", vms=["a", "ghost"]),  # one VM left: meaningless
        Rule(name="pin", kind="run_on", vms=["b"], hosts=["h2", "gone"]),
    ]
    snap = snapshot_from_inventory(
        [host("h1"), host("h2")],
        vms,
        rules,
        demand={"a": (0.5, 1000.0), "c": (3.0, 9000.0), "b": (1.0, 99999.0)},
        pinned={"a": "h1"},
    )
    by = {v.name: v for v in snap.vms}
    assert (by["a"].cpu, by["a"].mem_demand) == (0.5, 1000.0)
    assert (by["c"].cpu, by["c"].mem_demand) == (0.0, 0.0)  # stopped: samples ignored
    assert by["b"].mem_demand == 2048  # never above what it was given
    kept = {r.name: r for r in snap.rules}
    assert kept["apart"].vms == ["a", "b"]
    assert "pair" not in kept
    assert kept["pin"].hosts == ["h2"]
    assert kept["cooldown:a"].hosts == ["h1"] and kept["cooldown:a"].strength == "must"


def test_an_operators_rule_never_collides_with_a_generated_pin() -> None:
    """Issue 23: a rule named like a pin ("cooldown-a", "migrating-b") made every DRS run
    fail on a duplicate name, or replaced the pin. Pins use a character rule names cannot."""
    vms = [vm("a", "h1"), vm("b", "h2", migrating=True)]
    rules = [
        Rule(name="cooldown-a", kind="run_on", strength="should", vms=["a"], hosts=["h1"]),
        Rule(name="migrating-b", kind="anti_affinity", strength="should", vms=["a", "b"]),
    ]
    snap = snapshot_from_inventory(
        [host("h1"), host("h2")], vms, rules, demand={}, pinned={"a": "h1"}
    )
    validate(snap)  # no duplicate names
    names = sorted(r.name for r in snap.rules)
    assert names == ["cooldown-a", "cooldown:a", "migrating-b", "migrating:b"], names
    # ... and no operator can create a rule under a pin's name.
    for pin in ("cooldown:a", "migrating:b"):
        with pytest.raises(ValidationError):
            RuleCreate(name=pin, kind="run-on", vms=["a"], hosts=["h1"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([512, 1024, 2048, 4096]), min_size=1, max_size=12),
    hosts=st.lists(st.sampled_from([4096, 6144, 8192, 16384]), min_size=2, max_size=4),
    incoming=st.integers(min_value=0, max_value=4096),
)
def test_drs_never_plans_what_the_prechecks_refuse(
    sizes: list[int], hosts: list[int], incoming: int
) -> None:
    """Every move of a plan on the inventory passes the pre-checks' memory check, applied
    one after the other (the plan's order), with a migration under way counted."""
    outs = [host(f"h{i}", mib=m) for i, m in enumerate(hosts)]
    vms = [vm(f"v{i}", "h0", mib=m) for i, m in enumerate(sizes)]
    held = {h.name: sum(v.memory_mib for v in vms if v.host == h.name) for h in outs}
    outs = [
        h.model_copy(update={"committed_mib": held[h.name] + (incoming if h.name == "h1" else 0)})
        for h in outs
    ]
    snap = snapshot_from_inventory(outs, vms)
    result = plan(snap, Policy(threshold=5), NOW)
    committed = {h.name: h.committed_mib for h in outs}
    total = {h.name: h.memory_mib for h in outs}
    mem = {v.name: v.memory_mib for v in vms}
    for m in sorted(result.moves, key=lambda m: m.wave):
        free = total[m.target] - HOST_RESERVED_MIB - committed[m.target]
        assert mem[m.vm] <= free, (m, free)
        committed[m.target] += mem[m.vm]
        committed[m.source] -= mem[m.vm]


def test_a_pin_never_contradicts_the_rules() -> None:
    """A migrating VM (pinned where it is) that a must rule sends elsewhere, and a VM in its
    cool-down on a host a rule now forbids: the snapshot still plans (no contradiction), and
    the cool-down gives way to the rule."""
    rules = [
        Rule(name="a-on-h2", kind="run_on", vms=["a"], hosts=["h2"]),
        Rule(name="b-off-h1", kind="not_run_on", vms=["b"], hosts=["h1"]),
    ]
    snap = snapshot_from_inventory(
        [host("h1"), host("h2")],
        [vm("a", "h1", migrating=True), vm("b", "h1")],
        rules,
        pinned={"b": "h1"},
    )
    result = plan(snap, Policy(threshold=1), NOW)  # would raise on contradictory rules
    assert result.placement == {"a": "h1", "b": "h2"}


def test_measured_dirty_rates_and_degraded_hosts() -> None:
    sick = host("h1")
    assert sick.facts is not None
    sick = sick.model_copy(update={"facts": sick.facts.model_copy(update={"health": "degraded"})})
    vms = [vm("a", "h1"), vm("b", "h2", state="stopped")]
    snap = snapshot_from_inventory([sick, host("h2")], vms, dirty={"a": 40.0, "b": 9.0})
    by = {v.name: v for v in snap.vms}
    assert (by["a"].dirty_rate_mib_s, by["b"].dirty_rate_mib_s) == (40.0, 0.0)
    assert {h.name: h.health.value for h in snap.hosts} == {"h1": "ok", "h2": "ok"}
    snap = snapshot_from_inventory([sick, host("h2")], vms, proactive=True)
    assert {h.name: h.health.value for h in snap.hosts} == {"h1": "degraded", "h2": "ok"}


def test_demand_window_keeps_the_latest_dirty_rate_within_the_window() -> None:
    from datetime import timedelta

    from qmotion.api.host import HostMetrics, VmMetrics
    from qmotion.server.automation.demand import DemandWindow

    w = DemandWindow(window_s=60)

    def sample(at: datetime, cpu: float, dirty: float | None) -> HostMetrics:
        v = VmMetrics(
            name="a",
            cpu_percent=cpu,
            rss_bytes=512 << 20,
            memory_mib=1024,
            dirty_rate_mib_s=dirty,
        )
        return HostMetrics(
            sampled_at=at,
            cpus=4,
            cpu_percent=0,
            memory_total_bytes=1,
            memory_available_bytes=1,
            vms_memory_mib=1024,
            vms=[v],
        )

    w.add(sample(NOW, 50, 12.0))
    w.add(sample(NOW + timedelta(seconds=30), 150, None))  # not measured again: kept
    assert w.demand(NOW + timedelta(seconds=30)) == {"a": (1.0, 512.0)}
    assert w.dirty_rates(NOW + timedelta(seconds=30)) == {"a": 12.0}
    assert w.dirty_rates(NOW + timedelta(seconds=100)) == {}
    assert w.demand(NOW + timedelta(seconds=100)) == {}
