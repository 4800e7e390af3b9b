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
RARP = b"\x80\x35"
WATCH_FOR_S = 30.0  # after the resume; a guest that is silent longer is not waited for
UNARMED_FOR_S = 6 * 3600.0  # longer than any migration's completion timeout


def classify(frame: bytes, pkttype: int, macs: set[bytes]) -> str | None:
    """Which mark a frame on the VM's tap is: one the host delivers to the guest (outgoing
    on the tap, addressed to its MAC), one the guest sends (from its MAC), or neither.
    QEMU's own announce (RARP, ethertype 0x8035) carries the guest's MAC but is QEMU's."""
    if len(frame) < 14:
        return None
    if pkttype == PACKET_OUTGOING:
        return CLIENT if frame[:6] in macs else None
    if frame[6:12] in macs and frame[12:14] != RARP:
        return GUEST
    return None


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
        self._created = time.monotonic()
        try:
            for tap in taps:
                # Protocol 0 until bound: no frame of any other interface is ever queued.
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self._socks.append(s)
                # Python's bind converts the protocol to network order itself.
                s.bind((tap, ETH_P_ALL))
            self._thread = threading.Thread(target=self._run, name="tapwatch", daemon=True)
            self._thread.start()
        except BaseException:
            for s in self._socks:
                s.close()
            raise

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
            if at is None and time.monotonic() - self._created > UNARMED_FOR_S:
                return  # nobody said resumed or stopped: a watch never outlives this
            try:
                ready, _, _ = select.select(self._socks, [], [], 0.2)
            except (OSError, ValueError):
                return
            for s in ready:
                try:
                    frame, addr = s.recvfrom(128)
                except OSError:
                    return  # the tap is gone: the VM was removed here
                kind = classify(frame, addr[2], self._macs)
                if kind is not None:
                    recent[kind].append((time.time(), time.monotonic()))
            at = self._resumed_at
            if at is None:
                continue
            for kind, stamps in recent.items():
                first = next((mono for wall, mono in stamps if wall >= at), None)
                if kind not in seen and first is not None:
                    seen.add(kind)
                    self._record(kind, first)
