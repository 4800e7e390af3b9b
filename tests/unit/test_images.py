"""Image import and VM disks made from images (qmotion.agent.vms.images), on real image files made
by qemu-img: what is accepted is copied whole and stays sparse; what is refused names the
field and the reason and writes nothing."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import Conflict, SpecRejected
from qmotion.agent.vms import images
from qmotion.api.storage import ImageImportRequest
from qmotion.api.vm import Disk

MiB = 1 << 20


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def info(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(qemu_img("info", "--output=json", str(path)))
    return data


def write(path: Path, offset_mib: int, mib: int, pattern: int) -> None:
    subprocess.run(
        ["qemu-io", "-c", f"write -P {pattern} {offset_mib}M {mib}M", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    # Uploads go into a datastore: an import reads nothing else (but the built images' cache).
    for d in ("lib", "other", "lib/uploads", "elsewhere"):
        (tmp_path / d).mkdir()
    return AgentConfig(
        name="h1",
        state_dir=tmp_path / "state",
        token="t",
        datastores=(
            DatastoreConfig("lib", tmp_path / "lib", shared=True),
            DatastoreConfig("other", tmp_path / "other", shared=False),
        ),
    )


def req(file: Path, name: str = "deb", datastore: str = "lib") -> ImageImportRequest:
    return ImageImportRequest(file=str(file), name=name, datastore=datastore)


def test_a_qcow2_image_is_copied_whole_flat_and_sparse(config: AgentConfig, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    base = lib / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "256M")
    write(base, 0, 8, 0x11)
    top = tmp_path / "lib" / "uploads" / "top.qcow2"
    # Its backing file lies in the datastore the image goes to: accepted, and flattened.
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    write(top, 100, 4, 0x22)
    got = images.import_image(config, req(top))
    assert (got.datastore, got.path, got.format) == ("lib", ".images/deb.qcow2", "qcow2")
    copy = lib / got.path
    meta = info(copy)
    assert "backing-filename" not in meta and meta["virtual-size"] == 256 * MiB
    assert got.virtual_size == 256 * MiB and got.allocated_bytes < 32 * MiB  # holes kept
    # The same bytes as the chain it came from.
    qemu_img("compare", str(top), str(copy))
    assert [p.name for p in (lib / ".images").iterdir()] == ["deb.qcow2"]  # no partial left
    # A second image of that name on that datastore is refused.
    with pytest.raises(Conflict, match="already has an image"):
        images.import_image(config, req(top))


def test_a_raw_image_is_accepted(config: AgentConfig, tmp_path: Path) -> None:
    raw = tmp_path / "lib" / "uploads" / "disk.img"
    qemu_img("create", "-q", "-f", "raw", str(raw), "32M")
    write(raw, 1, 1, 0x33)
    got = images.import_image(config, req(raw, name="plain", datastore="other"))
    assert (got.path, got.format, got.virtual_size) == (".images/plain.raw", "raw", 32 * MiB)
    qemu_img("compare", str(raw), str(tmp_path / "other" / got.path))


@pytest.mark.parametrize(
    "case",
    [
        "vmdk",
        "corrupt",
        "backing_outside",
        "missing",
        "outside_roots",
        "symlink_out",
        "json_backing",
        "data_file",
    ],
)
def test_refusals_name_the_field_and_write_nothing(
    config: AgentConfig, tmp_path: Path, case: str
) -> None:
    uploads = tmp_path / "lib" / "uploads"
    file = uploads / f"{case}.img"
    match = {
        "vmdk": "is a vmdk image",
        "corrupt": "corrupt",
        "backing_outside": "outside datastore lib",
        "missing": "is not a file",
        "outside_roots": "outside what an import may read",
        "symlink_out": "outside what an import may read",
        "json_backing": "names a backing file as json",
        "data_file": "external file",
    }[case]
    if case == "vmdk":
        qemu_img("create", "-q", "-f", "vmdk", str(file), "16M")
    elif case == "corrupt":
        qemu_img("create", "-q", "-f", "qcow2", str(file), "16M")
        write(file, 0, 1, 0x44)
        with open(file, "r+b") as fh:  # an L1 entry pointing nowhere sensible
            fh.seek(0x28)
            l1 = struct.unpack(">Q", fh.read(8))[0]
            fh.seek(l1)
            fh.write(bytes.fromhex("8000000000000201"))
    elif case in ("outside_roots", "symlink_out"):
        # A host file the agent (root) could read: never copied into a guest's disk.
        secret = tmp_path / "elsewhere" / "secret.img"
        secret.write_bytes(b"private key material\n" * 100)
        if case == "outside_roots":
            file = secret
        else:
            file.symlink_to(secret)
    elif case == "json_backing":
        secret = tmp_path / "elsewhere" / "secret.img"
        secret.write_bytes(b"private" * 1000)
        spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(secret)}})
        qemu_img(
            "create", "-q", "-f", "qcow2", "-u", "-b", f"json:{spec}", "-F", "raw", str(file), "16M"
        )
    elif case == "data_file":
        secret = tmp_path / "lib" / "uploads" / "data.raw"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret}", str(file), "16M")
    elif case == "backing_outside":
        base = tmp_path / "other" / "base.qcow2"  # another datastore: not where it goes
        qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(file))
    with pytest.raises(SpecRejected, match=match) as refused:
        images.import_image(config, req(file))
    assert refused.value.field == "file"
    assert not (tmp_path / "lib" / ".images").exists(), "a refused import wrote something"


def test_unknown_datastore_is_refused(config: AgentConfig, tmp_path: Path) -> None:
    file = tmp_path / "lib" / "uploads" / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(file), "16M")
    with pytest.raises(SpecRejected, match="not available on host h1") as refused:
        images.import_image(config, req(file, datastore="nosuch"))
    assert refused.value.field == "datastore"


def test_a_vm_disk_is_a_full_copy_grown_to_its_size(config: AgentConfig, tmp_path: Path) -> None:
    src = tmp_path / "lib" / ".images" / "deb.qcow2"
    src.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(src), "64M")
    write(src, 0, 2, 0x55)
    disk = tmp_path / "other" / "vm1" / "disk0.qcow2"
    images.clone(config, "lib:.images/deb.qcow2", disk, "qcow2", 128 * MiB)
    meta = info(disk)
    assert meta["virtual-size"] == 128 * MiB and "backing-filename" not in meta
    # The image's bytes, then zeros where it grew.
    qemu_img("compare", str(src), str(disk))
    with pytest.raises(SpecRejected, match="is not on host h1"):
        images.clone(config, "lib:.images/nosuch.qcow2", disk.with_name("x.qcow2"), "qcow2", None)
    # Never over an existing file (a disk left by a deleted VM is someone's data).
    with pytest.raises(Conflict, match="never made over a file"):
        images.clone(config, "lib:.images/deb.qcow2", disk, "qcow2", None)
    # Only the library's images: not another file of the datastore, nor one outside it.
    (tmp_path / "lib" / "secret.qcow2").write_bytes(b"x")
    with pytest.raises(SpecRejected, match="not an image of the library"):
        images.clone(config, "lib:secret.qcow2", disk.with_name("y.qcow2"), "qcow2", None)
    with pytest.raises(ValueError, match=r"no '\.\.'"):
        Disk(datastore="other", path="v/d.qcow2", create_from="lib:.images/../../etc/shadow")
