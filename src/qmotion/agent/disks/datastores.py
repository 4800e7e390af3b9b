"""Disk files on this host's datastores: the datastore named, its free space, a free file name
for a new copy, what an image holds.

Shared by Storage vMotion (targets on another datastore of this host), the destination of a
shared-nothing migration (empty disks the source mirrors into) and cold transfers.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import OperationFailed, SpecRejected
from qmotion.hypervisor.blockjobs import qemu_img_info
from qmotion.hypervisor.errors import HypervisorError

SPACE_MARGIN = 1.05  # qcow2 metadata and the writes made while copying


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def datastore(config: AgentConfig, name: str, vm: str, field: str = "datastore") -> DatastoreConfig:
    """The datastore ``name`` of this host; refused (naming the ones it has) if absent."""
    ds = config.datastore(name)
    if ds is None:
        known = ", ".join(d.name for d in config.datastores) or "none"
        raise SpecRejected(
            f"datastore {name!r} is not available on host {config.name} (it has: {known})",
            vm=vm,
            field=field,
        )
    return ds


async def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image (see ``qemu_img_info``), failing as the agent does."""
    try:
        return await asyncio.to_thread(qemu_img_info, path)
    except HypervisorError as exc:
        raise OperationFailed.of(exc) from exc


def free_name(ds: DatastoreConfig, vm: str, index: int, fmt: str) -> str:
    """A path on ``ds`` for disk ``index`` of ``vm`` that no file has yet."""
    base = f"{vm}/disk{index}"
    for n in range(1000):
        rel = f"{base}.{fmt}" if n == 0 else f"{base}-{n}.{fmt}"
        if not (ds.path / rel).exists():
            return rel
    raise OperationFailed(f"no free file name for disk {index} of {vm} on {ds.name}", vm=vm)
