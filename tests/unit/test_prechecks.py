"""Each pre-check refusal, on pure snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qmotion.migration.params import streams_for
from qmotion.migration.prechecks import HostView, NetworkView, PrecheckInput, VmView, precheck


def host(name: str, **over: object) -> HostView:
    base = HostView(
        name=name,
        state="up",
        memory_mib=8192,
        committed_mib=0,
        cpu_models=frozenset({"qemu64", "Nehalem"}),
        machine_types=frozenset({"pc-i440fx-7.2", "pc"}),
        machine_aliases={"pc": "pc-i440fx-7.2"},
        bridges=frozenset({"vmbr0"}),
        datastores=frozenset({"shared"}),
    )
    return replace(base, **over)  # type: ignore[arg-type]


VM = VmView(
    name="web",
    host="h1",
    state="running",
    memory_mib=1024,
    cpu_model="qemu64",
    machine="pc-i440fx-7.2",
    bridges=("vmbr0",),
    datastores=("shared",),
)
HOSTS = {"h1": host("h1"), "h2": host("h2")}


def codes(vm: VmView = VM, target: str = "h2", **h2: object) -> list[str]:
    hosts = dict(HOSTS)
    if h2:
        hosts["h2"] = host("h2", **h2)
    return [r.code for r in precheck(PrecheckInput(vm, target, hosts))]


def test_go() -> None:
    assert codes() == []


@pytest.mark.parametrize(
    ("vm", "target", "h2", "expected"),
    [
        (replace(VM, state="stopped"), "h2", {}, "vm_not_running"),
        (VM, "h1", {}, "same_host"),
        (VM, "h9", {}, "unknown_host"),
        (VM, "h2", {"state": "down"}, "host_unavailable"),
        (VM, "h2", {"state": "maintenance"}, "host_unavailable"),
        (VM, "h2", {"committed_mib": 7000}, "insufficient_memory"),
        (replace(VM, cpu_model="Icelake-Server"), "h2", {}, "cpu_model_unsupported"),
        (VM, "h2", {"bridges": frozenset({"br1"})}, "bridge_missing"),
        (VM, "h2", {"datastores": frozenset({"local-h2"})}, "datastore_unreachable"),
        (replace(VM, machine="pc-q35-9.0"), "h2", {}, "machine_type_unavailable"),
        (replace(VM, migrating=True), "h2", {}, "already_migrating"),
    ],
)
def test_refusals(vm: VmView, target: str, h2: dict[str, object], expected: str) -> None:
    assert expected in codes(vm, target, **h2)


def test_statuses_separate_conflict_from_bad_request() -> None:
    refusals = precheck(PrecheckInput(VM, "h9", HOSTS))
    assert [(r.status, r.field) for r in refusals] == [(422, "to")]
    refusals = precheck(PrecheckInput(replace(VM, state="paused"), "h2", HOSTS))
    assert [r.status for r in refusals] == [409]


def test_memory_counts_the_host_reserve() -> None:
    # 8192 - 512 reserved - 6656 committed = 1024: exactly enough.
    assert codes(committed_mib=6656) == []
    assert codes(committed_mib=6657) == ["insufficient_memory"]


@pytest.mark.parametrize(
    ("accel", "version", "refused"),
    [
        ("tcg", "7.2.22", True),
        ("tcg", "9.0.0", False),
        ("tcg", "10.0.2", False),
        ("kvm", "7.2.22", False),
    ],
)
def test_tcg_source_on_old_qemu_is_refused(accel: str, version: str, refused: bool) -> None:
    hosts = {"h1": host("h1", accel=accel, qemu_version=version), "h2": host("h2")}
    refusals = precheck(PrecheckInput(VM, "h2", hosts))
    assert [r.code for r in refusals] == (["unsafe_tcg_migration"] if refused else [])
    if refused:
        assert (refusals[0].status, refusals[0].host) == (409, "h1")
        assert "QEMU 7.2.22" in refusals[0].message


def _nets(mig_mtu: int, mig: str = "198.19.1.11") -> tuple[NetworkView, ...]:
    return (
        NetworkView(mig, 24, mig_mtu, "eth1"),
        NetworkView(mig.replace("198.19", "198.18"), 24, 1500, "vmbr0"),
    )


def test_mtu_mismatch_on_the_preferred_migration_network_is_refused() -> None:
    hosts = {"h1": host("h1", networks=_nets(1500)), "h2": host("h2", networks=_nets(9000))}
    got = precheck(PrecheckInput(VM, "h2", hosts))
    assert [r.code for r in got] == ["mtu_mismatch"]
    assert "1500" in got[0].message and "9000" in got[0].message and got[0].status == 409
    # Same MTU on both ends (jumbo or not): go.
    hosts["h1"] = host("h1", networks=_nets(9000))
    assert precheck(PrecheckInput(VM, "h2", hosts)) == []


def test_mtu_of_networks_the_source_is_not_on_is_not_compared() -> None:
    # The source has no address on the destination's migration network: the stream is
    # routed, and the path MTU is the kernel's business.
    hosts = {
        "h1": host("h1", networks=_nets(1500, mig="198.19.2.11")),
        "h2": host("h2", networks=_nets(9000)),
    }
    assert precheck(PrecheckInput(VM, "h2", hosts)) == []


@pytest.mark.parametrize(
    ("rtt_ms", "cap", "history", "want"),
    [
        (0.2, None, None, 0),  # a LAN: one classic stream
        (150, None, None, 8),  # far, nothing known of the link: fill it
        (150, 125_000_000, None, 6),  # 1 Gbit/s over 150 ms: 18.75 MB in flight, 3 MiB each
        (50, 125_000_000, None, 2),  # at least two once the window binds
        (150, None, 40_000_000, 3),  # the last migration's rate, with headroom
    ],
)
def test_streams_fill_the_bandwidth_delay_product(
    rtt_ms: float, cap: int | None, history: float | None, want: int
) -> None:
    assert streams_for(rtt_ms / 1000, 6 << 20, cap_bps=cap, history_bps=history) == want


def test_tls_streams_spread_encryption_over_the_cores() -> None:
    assert streams_for(0.0002, None, tls=True, cpus=2) == 2
    assert streams_for(0.0002, None, tls=True, cpus=64) == 4
    assert streams_for(0.15, None, tls=True, cpus=2) == 8  # the path needs more anyway


def test_a_cluster_that_encrypts_refuses_hosts_without_a_certificate() -> None:
    hosts = {"h1": host("h1", peer_port=8101), "h2": host("h2")}
    got = precheck(PrecheckInput(VM, "h2", hosts, tls=True))
    assert [(r.code, r.host) for r in got] == [("tls_unavailable", "h2")]
    assert precheck(PrecheckInput(VM, "h2", hosts, tls=False)) == []
