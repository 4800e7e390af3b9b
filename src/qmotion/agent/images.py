"""Disk images on a host's datastores: imported into the image library, copied into VM disks.

An import is checked with ``qemu-img`` before anything is written: the format must be qcow2
or raw, a qcow2 must pass ``qemu-img check``, and a backing file must lie inside the
datastore the image goes to (one outside would tie the image to a file the cluster does not
manage). The image is then copied in full (``qemu-img convert``: backing chain flattened,
holes kept) to ``DATASTORE/images/NAME.FMT`` under a temporary name, renamed when complete.

A VM disk made from an image is a full copy too (not an overlay on the image): a VM disk then
has no backing file, so moving it (Storage vMotion, shared-nothing, cold) copies one file and
needs nothing on the other side; the price is the copy's time and space at creation.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected
from qmotion.api.storage import ImageImportRequest, ImageInfo

SUPPORTED = ("qcow2", "raw")
SPACE_MARGIN = 1.05


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def _info(path: Path, field: str) -> dict[str, Any]:
    proc = _qemu_img("info", "--output=json", str(path))
    if proc.returncode != 0:
        raise SpecRejected(
            f"{path} is not an image qemu-img can read: {proc.stderr.strip()}", field=field
        )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def _datastore(config: AgentConfig, name: str) -> DatastoreConfig:
    ds = config.datastore(name)
    if ds is None:
        known = ", ".join(d.name for d in config.datastores) or "none"
        raise SpecRejected(
            f"datastore {name!r} is not available on host {config.name} (it has: {known})",
            field="datastore",
        )
    return ds


def inspect(config: AgentConfig, req: ImageImportRequest) -> tuple[DatastoreConfig, dict[str, Any]]:
    """Everything an import refuses, naming the field; changes nothing."""
    ds = _datastore(config, req.datastore)
    source = Path(req.file)
    if not source.is_absolute() or not source.is_file():
        raise SpecRejected(f"{req.file} is not a file on host {config.name}", field="file")
    info = _info(source, "file")
    fmt = str(info.get("format"))
    if fmt not in SUPPORTED:
        raise SpecRejected(
            f"{req.file} is a {fmt} image; qcow2 and raw are supported (convert it with "
            "qemu-img convert first)",
            field="file",
        )
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        resolved = Path(str(backing))
        if not resolved.is_absolute():
            resolved = source.parent / resolved
        root = ds.path.resolve()
        if not resolved.resolve().is_relative_to(root):
            raise SpecRejected(
                f"{req.file} has its backing file {backing} outside datastore {ds.name} ({root})",
                field="file",
            )
    if fmt == "qcow2":
        check = _qemu_img("check", "--output=json", str(source))
        if check.returncode not in (0, 3):  # 3: leaked clusters only, no data at risk
            try:
                found = json.loads(check.stdout)
                detail = (
                    f"{found.get('corruptions', 0)} corruptions, "
                    f"{found.get('check-errors', 0)} check errors"
                )
            except ValueError:
                detail = check.stderr.strip()[:300]
            raise SpecRejected(f"{req.file} is corrupt (qemu-img check: {detail})", field="file")
    return ds, info


def import_image(config: AgentConfig, req: ImageImportRequest) -> ImageInfo:
    """Check ``req.file`` and copy it into the datastore's image folder."""
    ds, info = inspect(config, req)
    fmt = str(info["format"])
    rel = f"images/{req.name}.{fmt}"
    target = ds.path / rel
    if target.exists():
        raise Conflict(f"datastore {ds.name} already has an image {rel}", field="name")
    need = int(int(info.get("actual-size", 0)) * SPACE_MARGIN)
    st = os.statvfs(ds.path)
    if st.f_bavail * st.f_frsize < need:
        raise SpecRejected(
            f"datastore {ds.name} has {(st.f_bavail * st.f_frsize) >> 20} MiB free on host "
            f"{config.name}; the image needs {need >> 20} MiB",
            field="datastore",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    proc = _qemu_img("convert", "-O", fmt, req.file, str(partial))
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OperationFailed(f"copying {req.file} failed: {proc.stderr.strip()}")
    os.replace(partial, target)
    copied = _info(target, "file")
    return ImageInfo(
        datastore=ds.name,
        path=rel,
        format=fmt,
        virtual_size=int(copied["virtual-size"]),
        allocated_bytes=int(copied.get("actual-size", 0)),
    )


def clone(config: AgentConfig, image: str, target: Path, fmt: str, size: int | None) -> None:
    """A VM's disk as a full copy of ``image`` (``DATASTORE:PATH``), grown to ``size``."""
    ds_name, _, rel = image.partition(":")
    ds = _datastore(config, ds_name)
    source = ds.path / rel
    if not source.is_file():
        raise SpecRejected(f"image {image} is not on host {config.name} ({source})", field="image")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    proc = _qemu_img("convert", "-O", fmt, str(source), str(partial))
    if proc.returncode == 0 and size:
        virtual = int(_info(partial, "image")["virtual-size"])
        if size > virtual:
            proc = _qemu_img("resize", "-f", fmt, str(partial), str(size))
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OperationFailed(f"making {target} from image {image} failed: {proc.stderr.strip()}")
    os.replace(partial, target)
