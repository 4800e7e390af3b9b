"""The image library through the manager, on a real lab: an image checked and copied onto a
shared datastore, listed, and a VM made from it (its own full copy, grown, on a local
datastore), then moved with its disk to another host while it runs; refusals name the reason."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qmotion.api.server import DiskCreate, ImageImport, MigrateRequest, TaskState, VmCreate
from qmotion.api.vm import VmState
from qmotion.client import Conflict, Invalid
from qmotion.client.server import ServerClient
from qmotion.lab import Lab

from .conftest import wait_task
from .test_cold import defined_on
from .test_storage import ds_path

MiB = 1 << 20


def make_image(lab: Lab, name: str) -> Path:
    """An upload in a datastore (an import reads nothing outside them)."""
    path = ds_path(lab, "shared") / "uploads" / f"{name}.qcow2"
    path.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x6b 0 3M", str(path)], check=True, capture_output=True
    )
    return path


def test_an_imported_image_makes_vms_with_their_own_copy(lab: Lab, server: ServerClient) -> None:
    source = make_image(lab, "img1")
    image = server.import_image(ImageImport(file=str(source), name="img1"))
    assert (image.datastore, image.format, image.virtual_size) == ("shared", "qcow2", 64 * MiB)
    library_copy = ds_path(lab, "shared") / image.path
    assert library_copy.is_file()
    assert "img1" in [i.name for i in server.images()]  # (other tests import theirs)
    with pytest.raises(Conflict, match="exists"):
        server.import_image(ImageImport(file=str(source), name="img1"))

    vm = server.create_vm(
        VmCreate(
            name="fromimg",
            host="h1",
            memory="128M",
            image="img1",
            disk=DiskCreate(datastore="local-h1", size_mib=128),
        )
    )
    try:
        disk = ds_path(lab, "local-h1") / vm.disks[0].path
        meta = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(disk)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        # A full copy (no backing file on the library), grown to the size asked for.
        assert meta["virtual-size"] == 128 * MiB and "backing-filename" not in meta
        subprocess.run(["qemu-img", "compare", str(source), str(disk)], check=True)
        assert lab.agent("h1").vm("fromimg").spec.boot.kind == "disk"
        # It runs from its disk, and moves with it (shared-nothing) to h2's local datastore.
        server.start_vm("fromimg")
        task = wait_task(
            server,
            server.migrate("fromimg", MigrateRequest(to="h2", datastore="local-h2")),
            timeout_s=180,
        )
        assert task.state == TaskState.SUCCEEDED, (task.error, [e.message for e in task.events])
        moved = server.vm("fromimg")
        assert moved.host == "h2" and moved.state == VmState.RUNNING
        assert defined_on(lab, "fromimg") == ["h2"] and not disk.exists()
        new = ds_path(lab, "local-h2") / moved.disks[0].path
        subprocess.run(["qemu-img", "compare", "-U", str(source), str(new)], check=True)
    finally:
        server.delete_vm("fromimg", force=True)
    assert library_copy.is_file()  # the library's image is never a VM's disk


def test_image_refusals_name_the_reason(lab: Lab, server: ServerClient) -> None:
    vmdk = ds_path(lab, "shared") / "uploads" / "disk.vmdk"
    vmdk.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    with pytest.raises(Invalid, match="vmdk") as bad:
        server.import_image(ImageImport(file=str(vmdk), name="vmdk1"))
    assert bad.value.detail.field == "file"
    with pytest.raises(Invalid, match="is not a file"):
        server.import_image(ImageImport(file="/nonexistent/x.qcow2", name="none1"))
    with pytest.raises(Invalid, match="outside what an import may read"):
        server.import_image(ImageImport(file=str(Path(lab.record.dir) / "lab.json"), name="x1"))
    with pytest.raises(Invalid, match="no image named 'nosuch'"):
        server.create_vm(
            VmCreate(
                name="noimg",
                host="h1",
                memory="128M",
                image="nosuch",
                disk=DiskCreate(datastore="local-h1"),
            )
        )
    source = make_image(lab, "img2")
    server.import_image(ImageImport(file=str(source), name="img2", datastore="shared"))
    with pytest.raises(Invalid, match="smaller than image img2") as small:
        server.create_vm(
            VmCreate(
                name="tiny",
                host="h1",
                memory="128M",
                image="img2",
                disk=DiskCreate(datastore="local-h1", size_mib=16),
            )
        )
    assert small.value.detail.field == "disk.size_mib"
    with pytest.raises(Conflict, match="does not reach datastore local-h2"):
        server.create_vm(
            VmCreate(
                name="far",
                host="h1",
                memory="128M",
                image="img2",
                disk=DiskCreate(datastore="local-h2"),
            )
        )
    assert [v.name for v in server.vms() if v.name in ("noimg", "tiny", "far")] == []
