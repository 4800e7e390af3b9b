"""The first frames through an incoming VM's taps after it resumes: the switchover's last marks.

QEMU's downtime ends when the destination resumes, but a client sees the VM again only once a
frame of its reaches the guest there, and the guest's answer leaves. A packet socket on each tap
sees both directions (frames the host delivers to the guest are outgoing on the tap); the
first of each after the resume is recorded, on the agent's monotonic clock.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
GUEST, CLIENT = "guest_frame_sent", "client_frame_delivered"
WATCH_FOR_S = 30.0  # after the resume; a guest that is silent longer is not waited for


class TapWatch:
    """Watches ``taps`` from creation; ``resumed(t)`` arms it; marks go to ``record`` on the
    monotonic clock, like the agent's other migration events."""

    def __init__(
        self, taps: list[str], mac: list[str], record: Callable[[str, float], None]
    ) -> None:
        self._macs = {bytes.fromhex(m.replace(":", "")) for m in mac}
        self._record = record
        self._resumed_at: float | None = None
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        for tap in taps:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                s.bind((tap, 0))
            except OSError:
                s.close()
                raise
            self._socks.append(s)
        self._thread = threading.Thread(target=self._run, name="tapwatch", daemon=True)
        self._thread.start()

    def resumed(self, wall: float) -> None:
        """QEMU's RESUME, by its event's (wall-clock) timestamp."""
        self._resumed_at = wall

    def close(self) -> None:
        """Stop watching (the thread closes the sockets as it ends)."""
        self._stop.set()

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            for s in self._socks:
                s.close()

    def _watch(self) -> None:
        # Frames seen before the agent learns of the resume (its event arrives a moment after
        # QEMU resumed) are kept briefly: which came after the resume is decided by QEMU's own
        # timestamp of it, on the wall clock.
        recent: dict[str, deque[tuple[float, float]]] = {
            k: deque(maxlen=256) for k in (GUEST, CLIENT)
        }
        seen: set[str] = set()
        while not self._stop.is_set() and len(seen) < 2:
            at = self._resumed_at
            if at is not None and time.time() - at > WATCH_FOR_S:
                return
            try:
                ready, _, _ = select.select(self._socks, [], [], 0.2)
            except (OSError, ValueError):
                return
            for s in ready:
                try:
                    frame, addr = s.recvfrom(128)
                except OSError:
                    return  # the tap is gone: the VM was removed here
                stamp = (time.time(), time.monotonic())
                if len(frame) < 14:
                    continue
                if addr[2] == PACKET_OUTGOING and frame[:6] in self._macs:
                    recent[CLIENT].append(stamp)
                elif addr[2] != PACKET_OUTGOING and frame[6:12] in self._macs:
                    recent[GUEST].append(stamp)
            at = self._resumed_at
            if at is None:
                continue
            for kind, stamps in recent.items():
                first = next((mono for wall, mono in stamps if wall >= at), None)
                if kind not in seen and first is not None:
                    seen.add(kind)
                    self._record(kind, first)
