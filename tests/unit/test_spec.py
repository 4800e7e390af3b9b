"""Malformed VM specs are refused with the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from qmotion.api.vm import DiskBoot, VmSpec


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "vm1", "memory": "512M", "nics": [{"mac": "52:54:00:00:00:01"}]}
    base.update(over)
    return base


def error_fields(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        VmSpec.model_validate(data)
    return [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]


def test_valid_spec_defaults() -> None:
    s = VmSpec.model_validate(spec())
    assert s.memory == 512
    assert s.vcpus == 1
    assert s.boot.kind == "kernel"


def test_memory_accepts_sizes_and_mib() -> None:
    assert VmSpec.model_validate(spec(memory="1G")).memory == 1024
    assert VmSpec.model_validate(spec(memory=768)).memory == 768


def test_unknown_field_is_named() -> None:
    assert "memroy" in error_fields(spec(memroy="1G"))


def test_memory_not_a_size() -> None:
    assert error_fields(spec(memory="lots")) == ["memory"]


def test_memory_too_small() -> None:
    assert error_fields(spec(memory="1M")) == ["memory"]


def test_bad_name() -> None:
    assert error_fields(spec(name="Bad Name")) == ["name"]


def test_multicast_mac_refused() -> None:
    assert error_fields(spec(nics=[{"mac": "01:00:5e:00:00:01"}])) == ["nics.0.mac"]


def test_duplicate_macs_refused() -> None:
    nics = [{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:01"}]
    with pytest.raises(ValidationError, match="share a MAC"):
        VmSpec.model_validate(spec(nics=nics))


def test_disk_boot_needs_a_disk() -> None:
    with pytest.raises(ValidationError, match="no disks"):
        VmSpec.model_validate(spec(boot={"kind": "disk"}))


def test_disk_path_must_stay_in_datastore() -> None:
    disks = [{"datastore": "shared", "path": "../etc/passwd"}]
    assert error_fields(spec(disks=disks)) == ["disks.0.path"]


def test_disk_boot_spec() -> None:
    s = VmSpec.model_validate(
        spec(boot={"kind": "disk"}, disks=[{"datastore": "shared", "path": "a.qcow2"}])
    )
    assert isinstance(s.boot, DiskBoot)


def test_roundtrip_json() -> None:
    s = VmSpec.model_validate(spec(guest={"ip": "198.18.1.100/24", "fill_mib": 64}))
    assert VmSpec.model_validate_json(s.model_dump_json()) == s
