"""Disk images on a host's datastores: imported into the image library, copied into VM disks.

The agent runs as root, so what an import reads is confined: a file inside one of the host's
datastores or qmotion's cache of built images (``cache_dir()/debian``), never another host
file. It is checked with ``qemu-img`` before anything is written: qcow2 or raw, no external
data file, every backing file of the chain a plain path inside the datastore the image goes to
(no ``json:`` or protocol names: those could read any file or reach any host), and a qcow2 must
pass ``qemu-img check``. The image is then copied in full (``qemu-img convert`` told the
format, never probing again: backing chain flattened, holes kept) to
``DATASTORE/.images/NAME.FMT`` (a folder no VM disk path can name: VM names cannot start with
a dot) under a unique temporary name, and published by a link that refuses an existing name.

A VM disk made from an image is a full copy too (not an overlay on the image): a VM disk then
has no backing file, so moving it (Storage vMotion, shared-nothing, cold) copies one file and
needs nothing on the other side; the price is the copy's time and space at creation. It is
never made over an existing file.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected
from qmotion.api.storage import ImageImportRequest, ImageInfo
from qmotion.paths import cache_dir

SUPPORTED = ("qcow2", "raw")
SPACE_MARGIN = 1.05
LIBRARY = ".images"
_publishing = threading.Lock()  # the name check and the link, one import at a time


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def _info(path: Path, field: str, fmt: str | None = None) -> dict[str, Any]:
    proc = _qemu_img("info", "--output=json", *(["-f", fmt] if fmt else []), str(path))
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


def import_roots(config: AgentConfig) -> list[Path]:
    """Where an import may read from: the host's datastores and the built images' cache."""
    return [d.path.resolve() for d in config.datastores] + [(cache_dir() / "debian").resolve()]


def _confined(config: AgentConfig, file: str) -> Path:
    source = Path(file)
    if not source.is_absolute():
        raise SpecRejected(f"{file} is not an absolute path", field="file")
    try:
        real = source.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SpecRejected(f"{file} is not a file on host {config.name}", field="file") from None
    if not real.is_file():
        raise SpecRejected(f"{file} is not a file on host {config.name}", field="file")
    roots = import_roots(config)
    if not any(real.is_relative_to(r) for r in roots):
        raise SpecRejected(
            f"{file} is outside what an import may read on host {config.name}: put it in one "
            f"of its datastores ({', '.join(str(r) for r in roots)})",
            field="file",
        )
    return real


def _check_chain(
    source: Path, fmt: str, root: Path, file: str, ds: str, backing_allowed: bool = True
) -> None:
    """Every image of the chain: no external data file, backing files plain paths in DS
    (none at all for an upload: it brings no chain, and would read the datastore's files)."""
    proc = _qemu_img("info", "--output=json", "--backing-chain", "-f", fmt, str(source))
    if proc.returncode != 0:
        raise SpecRejected(
            f"{file}'s backing chain cannot be read: {proc.stderr.strip()}", field="file"
        )
    for layer in json.loads(proc.stdout):
        specific = (layer.get("format-specific") or {}).get("data") or {}
        if specific.get("data-file"):
            raise SpecRejected(
                f"{file} keeps its data in an external file ({specific['data-file']}): "
                "not supported",
                field="file",
            )
        backing = layer.get("backing-filename")
        if not backing:
            continue
        if not backing_allowed:
            raise SpecRejected(
                f"{file} has a backing file ({backing}): upload a standalone image "
                "(qemu-img convert flattens it)",
                field="file",
            )
        name = str(backing)
        if name.startswith("json:") or ":" in name.split("/", 1)[0]:
            raise SpecRejected(
                f"{file} names a backing file as {name.split(':', 1)[0]}:..., not as a path "
                f"in datastore {ds}",
                field="file",
            )
        path = Path(name) if Path(name).is_absolute() else Path(layer["filename"]).parent / name
        if not path.resolve().is_relative_to(root):
            raise SpecRejected(
                f"{file} has its backing file {name} outside datastore {ds} ({root})",
                field="file",
            )


def inspect(
    config: AgentConfig, req: ImageImportRequest, backing_allowed: bool = True
) -> tuple[DatastoreConfig, Path, str]:
    """Everything an import refuses, naming the field; changes nothing. Returns the
    datastore, the file (symlinks resolved) and its format."""
    ds = _datastore(config, req.datastore)
    source = _confined(config, req.file)
    fmt = str(_info(source, "file").get("format"))
    if fmt not in SUPPORTED:
        raise SpecRejected(
            f"{req.file} is a {fmt} image; qcow2 and raw are supported (convert it with "
            "qemu-img convert first)",
            field="file",
        )
    _check_chain(source, fmt, ds.path.resolve(), req.file, ds.name, backing_allowed)
    if fmt == "qcow2":
        check = _qemu_img("check", "--output=json", "-f", fmt, str(source))
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
    return ds, source, fmt


def _taken(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.glob(f"{name}.*") if p.suffix.lstrip(".") in SUPPORTED]


def import_image(
    config: AgentConfig, req: ImageImportRequest, backing_allowed: bool = True
) -> ImageInfo:
    """Check ``req.file`` and copy it into the datastore's image library."""
    ds, source, fmt = inspect(config, req, backing_allowed)
    folder = ds.path / LIBRARY
    if taken := _taken(folder, req.name):
        raise Conflict(f"datastore {ds.name} already has an image {taken[0]}", field="name")
    need = int(int(_info(source, "file", fmt).get("actual-size", 0)) * SPACE_MARGIN)
    st = os.statvfs(ds.path)
    if st.f_bavail * st.f_frsize < need:
        raise SpecRejected(
            f"datastore {ds.name} has {(st.f_bavail * st.f_frsize) >> 20} MiB free on host "
            f"{config.name}; the image needs {need >> 20} MiB",
            field="datastore",
        )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{req.name}.{fmt}"
    partial = folder / f".{req.name}.{secrets.token_hex(4)}.partial"
    try:
        proc = _qemu_img("convert", "-f", fmt, "-O", fmt, str(source), str(partial))
        if proc.returncode != 0:
            raise OperationFailed(f"copying {req.file} failed: {proc.stderr.strip()}")
        with _publishing:
            # Of two imports of one name (in any format) one wins; the link never replaces.
            if taken := _taken(folder, req.name):
                raise Conflict(f"datastore {ds.name} already has an image {taken[0]}", field="name")
            os.link(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    copied = _info(target, "file", fmt)
    return ImageInfo(
        datastore=ds.name,
        path=f"{LIBRARY}/{target.name}",
        format=fmt,
        virtual_size=int(copied["virtual-size"]),
        allocated_bytes=int(copied.get("actual-size", 0)),
    )


def clone(config: AgentConfig, image: str, target: Path, fmt: str, size: int | None) -> None:
    """A VM's disk as a full copy of ``image`` (``DATASTORE:PATH`` of a library image),
    grown to ``size``; refused over an existing file (it would be someone's data)."""
    ds_name, _, rel = image.partition(":")
    ds = _datastore(config, ds_name)
    source = (ds.path / rel).resolve()
    if not source.is_relative_to((ds.path / LIBRARY).resolve()):
        raise SpecRejected(f"{image} is not an image of the library", field="image")
    image_fmt = source.suffix.lstrip(".")
    if not source.is_file() or image_fmt not in SUPPORTED:
        raise SpecRejected(f"image {image} is not on host {config.name} ({source})", field="image")
    if target.exists():
        raise Conflict(f"{target} exists: a new VM's disk is never made over a file", field="disk")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        proc = _qemu_img("convert", "-f", image_fmt, "-O", fmt, str(source), str(partial))
        if proc.returncode == 0 and size:
            virtual = int(_info(partial, "image", fmt)["virtual-size"])
            if size > virtual:
                proc = _qemu_img("resize", "-f", fmt, str(partial), str(size))
        if proc.returncode != 0:
            raise OperationFailed(
                f"making {target} from image {image} failed: {proc.stderr.strip()}"
            )
        os.link(partial, target)  # never over a file that appeared meanwhile
    finally:
        partial.unlink(missing_ok=True)


def upload_file(config: AgentConfig, datastore: str) -> Path:
    """Where an upload lands before it is checked: a private file in the datastore's library
    folder (the import then reads it like any file of the datastore)."""
    ds = _datastore(config, datastore)
    folder = ds.path / LIBRARY
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".upload.{secrets.token_hex(8)}.partial"


def room(config: AgentConfig, datastore: str) -> int:
    """Bytes an upload may take on the datastore: its free space, less the margin the
    import's own copy needs (the upload is copied once more, then removed)."""
    st = os.statvfs(_datastore(config, datastore).path)
    return int(st.f_bavail * st.f_frsize / (1 + SPACE_MARGIN))
