"""QEMU's block layer as the disk movers read and drive it: image facts, the nodes a guest's
disks run on, mirror jobs and their copy mode.

Shared by the agent's Storage vMotion (one host) and its shared-nothing NBD mirror (two
hosts). Failures are ``HypervisorError``s with a message fit for the operator; the agent
turns them into its own errors where it answers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, also while QEMU has it open (``-U``: no lock taken)."""
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img info {path}: {proc.stderr.strip()}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


async def source_nodes(mon: Monitor) -> dict[int, tuple[str, str | None]]:
    """Disk index -> (format node, file node) the guest's device uses now (a disk moved
    before runs on nodes with other names than the command line gave)."""
    out: dict[int, tuple[str, str | None]] = {}
    for dev in await mon.execute("query-block"):
        qdev = str(dev.get("qdev", ""))
        inserted = dev.get("inserted") or {}
        if not qdev.startswith("/machine/peripheral/vblk") or "node-name" not in inserted:
            continue
        index = int(qdev.removeprefix("/machine/peripheral/vblk").split("/")[0])
        image = inserted.get("image") or {}
        file_node = None
        for n in await mon.execute("query-named-block-nodes", {"flat": True}):
            if (
                n.get("node-name") != inserted["node-name"]
                and n.get("file") == image.get("filename")
                and n.get("drv") == "file"
            ):
                file_node = str(n["node-name"])
        out[index] = (str(inserted["node-name"]), file_node)
    return out


async def mirror_jobs(mon: Monitor, prefix: str) -> dict[str, dict[str, Any]]:
    """QEMU's view of the mirror jobs whose ids start with ``prefix``: query-jobs (status,
    error) merged with query-block-jobs (ready, actively-synced, offset, len)."""
    jobs: dict[str, dict[str, Any]] = {}
    for j in await mon.execute("query-jobs"):
        if str(j.get("id", "")).startswith(prefix):
            jobs[j["id"]] = {
                "status": j.get("status"),
                "error": j.get("error"),
                "offset": j.get("current-progress", 0),
                "len": j.get("total-progress", 0),
            }
    for j in await mon.execute("query-block-jobs"):
        if j.get("device") in jobs:
            jobs[j["device"]].update(
                ready=bool(j.get("ready")),
                actively_synced=bool(j.get("actively-synced")),
                offset=j.get("offset", 0),
                len=j.get("len", 0),
            )
    return jobs


async def write_blocking(mon: Monitor, name: str, jobs: list[tuple[int, str]]) -> None:
    """Each mirror job (disk index, job id) switched to write-blocking: from then on a guest
    write completes only once both copies have it."""
    for index, job in jobs:
        try:
            await mon.execute(
                "block-job-change", {"id": job, "type": "mirror", "copy-mode": "write-blocking"}
            )
        except HypervisorError as exc:
            raise HypervisorError(
                f"switching the mirror of disk {index} of {name} to write-blocking failed: {exc}",
                vm=name,
            ) from exc
