"""The source's guard of a switchover that hangs while the guest is paused: its stream is
ended out of band, so that QEMU fails the migration and resumes the guest here.

From the source's STOP (QEMU stopped the guest for the final copy: its status still says
``active`` unless pause-before-switchover is on, then ``pre-switchover`` and ``device``) until
the stream completes, fails or goes postcopy, the guest is paused and QEMU holds its big lock
(save the pre-switchover pause itself, during which the disks' mirrors end under their own
limits): a link that dies then leaves the
guest paused until TCP gives up (~15 min), and every ordinary QMP command waits too, a cancel
included. Only the out-of-band ``yank`` gets through: it closes the migration's channels, the
write fails and QEMU fails the migration, which resumes the guest on the source. The decision
is a pure function of the clock (``yank_due``); the guard around it follows the watcher's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from typing import Protocol

from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)
# QEMU's statuses that end the paused stretch: the stream is over, or the guest runs on the
# destination in postcopy (postcopy has its own recovery).
ENDS = (
    "completed",
    "failed",
    "cancelled",
    "postcopy-device",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
)
MIN_STUCK_S = 5.0  # never sooner: a loaded host may take a few seconds for a large state
STUCK_DOWNTIMES = 10  # ... nor sooner than ten times the downtime the migration allows
TICK_S = 0.1
YANK_SETTLE_S = 1.0  # then a channel the yank could not reach is ended by the kernel


def stuck_limit_s(downtime_limit_ms: int) -> float:
    return max(MIN_STUCK_S, STUCK_DOWNTIMES * downtime_limit_ms / 1000)


def yank_due(status: str, stuck_since: float | None, now: float, downtime_limit_ms: int) -> bool:
    """The guest has been paused for the switchover longer than the migration can excuse.

    ``stuck_since``: the source's STOP, or when QEMU entered ``device``, or reached
    ``pre-switchover`` with the disks' mirrors ended (the mirrors' own end has its own
    limits); None when the guest is not paused for a switchover."""
    if status in ENDS or stuck_since is None:
        return False
    return now - stuck_since > stuck_limit_s(downtime_limit_ms)


class GuardedStream(Protocol):
    """What the guard reads of an outgoing migration (its watcher keeps it current)."""

    status: str
    stuck_since: float | None
    downtime_limit_ms: int
    uri: str | None
    events: list[tuple[str, float]]
    guard_error: str | None


async def guard_switchover(
    name: str, mon: Monitor, stream: GuardedStream, tick_s: float = TICK_S
) -> None:
    """Yank the stream of ``name`` once ``yank_due``; returns when the stretch ends first."""
    while True:
        since, now = stream.stuck_since, time.monotonic()
        if stream.status in ENDS or since is None:
            return
        if yank_due(stream.status, since, now, stream.downtime_limit_ms):
            break
        await asyncio.sleep(tick_s)
    stream.guard_error = (
        f"the switchover hung {now - since:.1f} s in {stream.status} (limit "
        f"{stuck_limit_s(stream.downtime_limit_ms):.1f} s): its channels were yanked here, "
        "the guest resumes on the source"
    )
    log.error("migration of %s: %s", name, stream.guard_error)
    stream.events.append(("yanked", now))
    with contextlib.suppress(HypervisorError):
        await mon.execute("yank", {"instances": [{"type": "migration"}]}, oob=True)
    await asyncio.sleep(YANK_SETTLE_S)
    if stream.status not in ENDS and stream.uri:
        # A channel still in its TLS handshake is not among the yanked ones.
        await asyncio.to_thread(destroy_sockets_to, stream.uri)


async def follow_and_guard(name: str, mon: Monitor, stream: GuardedStream) -> None:
    """At agent start, with no watcher of the stream: follow QEMU's status into ``stream``
    (its events, subscribed before it is asked: none is missed) and guard a device state."""
    guard: asyncio.Task[None] | None = None
    try:
        with contextlib.suppress(HypervisorError), mon.listen("MIGRATION") as listener:
            status = str((await mon.execute("query-migrate")).get("status", "none"))
            while True:
                stream.status = status
                if status != "device":
                    stream.stuck_since = None
                    return
                if stream.stuck_since is None:
                    stream.stuck_since = time.monotonic()
                if guard is None:
                    guard = asyncio.create_task(guard_switchover(name, mon, stream))
                event = await listener.get()
                data = event["data"]
                assert isinstance(data, dict)
                status = str(data["status"])
    finally:
        if guard is not None:
            guard.cancel()


def destroy_sockets_to(uri: str) -> None:
    """End every TCP socket of this host to the stream's destination (``ss -K``; the port is
    the destination QEMU's, so nothing else uses it)."""
    kind, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        return
    log.warning("ending the sockets of a stuck migration to %s", rest)
    try:
        subprocess.run(
            ["ss", "-K", "dst", host.strip("[]"), "dport", "=", port],
            capture_output=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not end the sockets to %s: %s", rest, exc)
