"""A VM's RAM and device state written to a file and read back, over its QEMU monitor (as
virsh managedsave): QEMU's migration to and from ``file:``.

The VM manager owns what the state means (the definition records it, a start resumes from
it); these functions only drive QEMU and leave it running or stopped as they say.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from qmotion.agent.errors import Conflict, OperationFailed
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

SAVE_TIMEOUT_S = 600.0  # saving or restoring a VM's RAM to a file


async def wait_migration(name: str, mon: Monitor, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str((await mon.execute("query-migrate")).get("status", "none"))
        if status in ("completed", "failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            raise OperationFailed(f"saving or restoring the state of {name} timed out", vm=name)
        await asyncio.sleep(0.05)


async def save_state(name: str, mon: Monitor, path: Path) -> None:
    """Stop the guest and write its state to ``path``. On failure, or when the caller is
    cancelled, the save is cancelled, the file removed and the guest runs on; a VM that is
    migrating is refused (before anything is touched: its migration is not ours to cancel)."""
    try:
        status = str((await mon.execute("query-migrate")).get("status", "none"))
    except HypervisorError as exc:
        raise OperationFailed(f"suspending {name} failed ({exc}); nothing done", vm=name) from exc
    if status in ("active", "setup", "pre-switchover", "device") or status.startswith("postcopy"):
        raise Conflict(f"VM {name} is migrating", vm=name)
    try:
        await mon.execute("stop")
        # A live migration before may have left capabilities a file cannot take.
        caps = await mon.execute("query-migrate-capabilities")
        on = [c["capability"] for c in caps if c.get("state")]
        if on:
            await mon.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": False} for c in on]},
            )
        # A file takes no TLS (a VM that arrived by a TLS migration keeps its creds).
        await mon.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "tls-creds": ""})
        await mon.execute("migrate", {"uri": f"file:{path}"})
        status = await wait_migration(name, mon, SAVE_TIMEOUT_S)
        if status != "completed":
            raise OperationFailed(f"saving the state of {name}: {status}", vm=name)
    except BaseException as exc:
        # Also when cancelled: a save left running would stop the guest for good and fill
        # a file nobody records.
        await _undo_save(mon, path)
        if isinstance(exc, (HypervisorError, OperationFailed)):
            raise OperationFailed(
                f"suspending {name} failed ({exc}); it runs on, nothing saved", vm=name
            ) from exc
        raise


async def _undo_save(mon: Monitor, path: Path) -> None:
    with contextlib.suppress(HypervisorError):
        # A save still under way (timed out) must not complete behind our back.
        await mon.execute("migrate_cancel")
        for _ in range(100):
            got = await mon.execute("query-migrate")
            if got.get("status") not in ("active", "setup", "cancelling"):
                break
            await asyncio.sleep(0.05)
    # One unlink of a local file: not worth a thread (as everywhere in the VM manager).
    path.unlink(missing_ok=True)  # noqa: ASYNC240
    with contextlib.suppress(HypervisorError):
        await mon.execute("cont")


async def load_state(name: str, mon: Monitor, saved: Path) -> None:
    """An incoming QEMU (started with ``-incoming defer``) reads the state from ``saved``."""
    await mon.execute("migrate-incoming", {"uri": f"file:{saved}"})
    status = await wait_migration(name, mon, SAVE_TIMEOUT_S)
    if status != "completed":
        raise OperationFailed(f"restoring {name} from {saved}: {status}", vm=name)
