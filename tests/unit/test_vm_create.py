"""What `vm create` accepts: disks as DATASTORE[:SIZE[:FORMAT]], images with their datastore,
cloud-init lines only with an image; refusals name the option and the reason."""

from __future__ import annotations

import pytest

from qmotion.api.server import DiskCreate, VmCreate
from qmotion.cli.vm import parse_disk


def test_disks_parse_with_their_defaults() -> None:
    assert parse_disk("shared") == DiskCreate(datastore="shared", size_mib=256)
    assert parse_disk("local-h1:2G") == DiskCreate(datastore="local-h1", size_mib=2048)
    assert parse_disk("local-h1:64M:raw") == DiskCreate(
        datastore="local-h1", size_mib=64, format="raw"
    )
    for bad, why in (
        ("x:1G:vmdk", "not qcow2 or raw"),
        (":1G", "expected"),
        ("a:b:c:d", "expected"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_disk(bad)


def test_vm_create_refuses_what_does_not_go_together() -> None:
    base = {"name": "v1", "host": "h1", "memory": "256M"}
    with pytest.raises(ValueError, match=r"an image needs disk\.datastore"):
        VmCreate.model_validate(base | {"image": "deb"})
    with pytest.raises(ValueError, match="must be #cloud-config keys"):
        VmCreate.model_validate(
            base | {"image": "deb", "disk": {"datastore": "s"}, "user_data": "#!/bin/sh\nls"}
        )
    with pytest.raises(ValueError, match="not YAML"):
        VmCreate.model_validate(
            base | {"image": "deb", "disk": {"datastore": "s"}, "user_data": "a: [b\n"}
        )
    with pytest.raises(ValueError, match="user_data is cloud-init's"):
        VmCreate.model_validate(base | {"user_data": "runcmd: []"})
    with pytest.raises(ValueError, match="size_mib is required without an image"):
        VmCreate.model_validate(base | {"disk": {"datastore": "shared"}})
    with pytest.raises(ValueError, match=r"extra_disks\[0\].size_mib is required"):
        VmCreate.model_validate(
            base | {"disk": {"datastore": "s", "size_mib": 1}, "extra_disks": [{"datastore": "s"}]}
        )
    ok = VmCreate.model_validate(
        base
        | {
            "image": "deb",
            "disk": {"datastore": "local-h1"},
            "extra_disks": [{"datastore": "shared", "size_mib": 64, "format": "raw"}],
        }
    )
    assert ok.disk is not None and ok.disk.size_mib is None and ok.extra_disks[0].format == "raw"
