"""The cloud-init NoCloud seed of a user's own guest: an ISO labelled cidata whose files say
the VM's name and put its address on the NIC with its MAC; attached in the same slot on
every host."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pycdlib
import yaml

from qmotion.agent.vms.seed import read_seed, write_seed
from qmotion.api.vm import VmSpec
from qmotion.hypervisor.qemu import build_argv

from .test_argv import PATHS, opt

SPEC = VmSpec.model_validate(
    {
        "name": "db1",
        "memory": "1G",
        "boot": {"kind": "disk"},
        "nics": [{"mac": "52:54:00:cd:4f:4c"}, {"mac": "52:54:00:cd:4f:4d"}],
        "disks": [{"datastore": "local-h1", "path": "db1/disk0.qcow2", "bootable": True}],
        "cloud_init": {
            "hostname": "db1",
            "address": "198.18.1.100/24",
            "user_data": "hostname: evil\nruncmd:\n  - [touch, /run/seeded]",
        },
    }
)


def test_the_seed_names_the_vm_and_addresses_its_nic_by_mac(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed(SPEC, path)
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
    finally:
        iso.close()
    files = read_seed(path)
    meta = json.loads(files["meta-data"])
    assert meta == {"instance-id": str(SPEC.uuid), "local-hostname": "db1"}
    assert files["user-data"].startswith("#cloud-config\n")
    # The operator's keys are kept; the VM's name is not theirs to change.
    assert yaml.safe_load(files["user-data"]) == {
        "runcmd": [["touch", "/run/seeded"]],
        "hostname": "db1",
        "preserve_hostname": False,
        "manage_etc_hosts": True,
    }
    net = json.loads(files["network-config"])
    assert net["version"] == 2
    assert net["ethernets"]["nic0"] == {
        "match": {"macaddress": "52:54:00:cd:4f:4c"},
        "set-name": "eth0",
        "addresses": ["198.18.1.100/24"],
    }
    assert net["ethernets"]["nic1"]["match"] == {"macaddress": "52:54:00:cd:4f:4d"}
    assert "addresses" not in net["ethernets"]["nic1"]


def test_the_seed_is_a_cdrom_in_a_fixed_slot_and_absent_without_cloud_init() -> None:
    paths = replace(PATHS, seed=Path("/s/seed.iso"))
    argv = build_argv(SPEC, paths, accel="tcg", machine="pc-i440fx-10.0")
    assert "file=/s/seed.iso,if=none,id=seed,format=raw,readonly=on,media=cdrom" in opt(
        argv, "-drive"
    )
    assert "ide-cd,drive=seed,id=seedcd,bus=ide.1,unit=0" in opt(argv, "-device")
    plain = SPEC.model_copy(update={"cloud_init": None})
    assert not any("seed" in a for a in build_argv(plain, paths, accel="tcg", machine="pc"))
