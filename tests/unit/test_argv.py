"""The QEMU command line is a pure function of the spec: identical on source and destination."""

from __future__ import annotations

from pathlib import Path

from qmotion.api.vm import VmSpec
from qmotion.hypervisor.qemu import LaunchPaths, build_argv, tap_name

SPEC = VmSpec.model_validate(
    {
        "name": "web",
        "memory": "1G",
        "vcpus": 2,
        "nics": [{"mac": "52:54:00:aa:bb:cc"}],
        "disks": [{"datastore": "shared", "path": "web.qcow2"}],
    }
)
PATHS = LaunchPaths(
    qmp_socket=Path("/run/q.sock"),
    console_log=Path("/s/console.log"),
    pidfile=Path("/s/qemu.pid"),
    disks=[Path("/ds/web.qcow2")],
    kernel=Path("/img/vmlinuz"),
    initrd=Path("/img/initrd"),
    cmdline="console=ttyS0",
)


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_carries_identity_and_resources() -> None:
    argv = build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2")
    assert opt(argv, "-uuid") == [str(SPEC.uuid)]
    assert opt(argv, "-m") == ["1024"]
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-machine") == ["pc-i440fx-7.2,accel=tcg"]
    assert any("mac=52:54:00:aa:bb:cc" in d for d in opt(argv, "-device"))
    assert "-incoming" not in argv


def test_devices_have_fixed_pci_addresses() -> None:
    devices = opt(build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2"), "-device")
    assert any("id=nic0" in d and "addr=0x3" in d for d in devices)
    assert any("id=vblk0" in d and "addr=0x10" in d for d in devices)


def test_destination_argv_differs_only_by_incoming() -> None:
    src = build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2")
    dst = build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2", incoming="defer")
    assert dst[: len(src)] == src
    assert dst[len(src) :] == ["-incoming", "defer"]


def test_tap_name_fits_ifnamsiz_and_is_stable() -> None:
    name = tap_name(SPEC, 0)
    assert len(name) <= 15
    assert name == tap_name(VmSpec.model_validate_json(SPEC.model_dump_json()), 0)


def test_huge_page_backing_keeps_the_ram_block_name_and_size() -> None:
    argv = build_argv(
        SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2", hugepages=Path("/dev/hugepages")
    )
    # pc.ram is the RAM block name plain -m gives, so either kind of host can receive it.
    assert opt(argv, "-machine") == ["pc-i440fx-7.2,accel=tcg,memory-backend=pc.ram"]
    assert opt(argv, "-object") == [
        "memory-backend-file,id=pc.ram,size=1024M,mem-path=/dev/hugepages,share=off"
    ]
    assert opt(argv, "-m") == ["1024"]


def test_cpu_models_from_either_help_format() -> None:
    from qmotion.hypervisor.qemu import _cpu_models

    old = "x86 qemu64  QEMU Virtual CPU version 2.5+\nx86 Haswell  Intel Core Processor\n"
    new = (
        "Available CPUs:\n"
        "  Haswell               (alias configured by machine type)\n"
        "  qemu64-v1             QEMU Virtual CPU version 2.5+\n"
        "\n"
        "Recognized CPUID flags:\n"
        "  3dnow 3dnowext abm\n"
    )
    assert _cpu_models(old) == ["qemu64", "Haswell"]
    assert _cpu_models(new) == ["Haswell", "qemu64-v1"]


def test_an_inherited_tap_is_named_by_its_descriptor_only() -> None:
    """QEMU, unprivileged, gets each tap open; QEMU refuses a name or scripts beside fd=."""
    argv = build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2", tap_fds=[7])
    assert opt(argv, "-netdev") == ["tap,id=net0,fd=7"]
    named = build_argv(SPEC, PATHS, accel="tcg", machine="pc-i440fx-7.2")
    assert opt(named, "-netdev") == [
        f"tap,id=net0,ifname={tap_name(SPEC, 0)},script=no,downscript=no"
    ]
