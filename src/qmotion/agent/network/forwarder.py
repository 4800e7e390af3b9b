"""Late-frame forwarding: frames that reach the source after the VM stopped are not lost.

Where the TCP blackout of a plain QEMU migration comes from (measured in the lab): the source
pauses at switchover; a client's segment that arrives at the source tap in the few milliseconds
before the network learns the VM's new location waits in the tap queue of a guest that never
runs again, and is dropped when the source exits. The client's TCP retransmits only after its
RTO (at least 200 ms on Linux; a tail-loss probe with one segment in flight also waits 200 ms),
which is the ~230 ms gap. Downtime itself is only ~10-30 ms.

So during a migration the source mirrors every frame sent to the VM's tap (tc mirred on the
tap's egress) into a capture veth. When QEMU reports the VM stopped, the frames captured since
then are sent straight out of the host's uplinks as soon as the destination has taken the VM's
traffic (steering), and later stragglers are forwarded the same way for a short while.

Frames are replayed from a margin before the STOP event, by the kernel's arrival stamps:
QEMU stops reading its tap somewhat before it reports STOP (the final dirty-bitmap sync holds
the big lock first, longer for bigger guests). A replayed frame the guest had already consumed
is a duplicate, which TCP discards; a lost one costs a retransmission timeout. Counting what the
guest read (the tap's ``tx_packets``) instead was tried: it misses frames queued in the tap
before the mirror went on, GSO packets the tap splits after the mirror, and copies the capture
link drops, each of which loses a frame, so the margin stays.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import subprocess
import threading
import time
from collections import deque

from pyroute2 import IPRoute

log = logging.getLogger(__name__)
SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
VNET_HDR_LEN = 10  # struct virtio_net_hdr precedes each frame on a PACKET_VNET_HDR socket
KEEP_S = 2.0  # captured frames older than this cannot matter any more
MARGIN_S = 0.05  # replay from this long before the stop: a duplicate costs ms, a loss 200 ms
SO_TIMESTAMPNS = 35  # Linux (x86_64, aarch64); Python has no constant for it
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SO_RCVBUFFORCE = 33
RCVBUF = 8 << 20  # GSO frames of a bulk transfer fill the default ~200 KiB between polls
FORWARD_FOR_S = 1.0  # after the first replay, keep forwarding stragglers this long
MIRROR_PREF = "10"  # the mirror filter's priority on the tap, to remove exactly it


def prepare_tap(tap: str) -> None:
    """Give a new tap the clsact qdisc that a migration's mirror filter will hang off."""
    _tc("qdisc", "replace", "dev", tap, "clsact")


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"tc {' '.join(args)}: {proc.stderr.strip()}")


def _mac_of(ip: IPRoute, ifname: str) -> bytes:
    (index,) = ip.link_lookup(ifname=ifname)
    return bytes.fromhex(str(ip.get_links(index)[0].get_attr("IFLA_ADDRESS")).replace(":", ""))


def _del_link(ip: IPRoute, name: str) -> None:
    for idx in ip.link_lookup(ifname=name):
        ip.link("del", index=idx)


def _stamp(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive time (wall clock) of a frame; now if it gave none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return float(sec) + float(nsec) / 1e9
    return time.time()


def _packet_socket(ifname: str, *, receive: bool) -> socket.socket:
    # A send-only socket has protocol 0: no receive hook, so the uplink's traffic (the
    # migration stream among it) is not cloned to it for the whole migration.
    proto = socket.htons(ETH_P_ALL) if receive else 0
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
    try:
        # Keep GSO frames and partial checksums intact on their way through userspace.
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        # 0: keep the socket's protocol (Python would byte-swap one given here again).
        s.bind((ifname, 0))
    except BaseException:
        s.close()
        raise
    return s


class LateFrameForwarder:
    """One per migrating NIC, on the source host; a daemon thread does the work."""

    def __init__(self, tap: str, bridge: str, mac: str, tag: str) -> None:
        self.tap, self.bridge, self.mac = tap, bridge, mac.lower()
        self._mac_bytes = bytes.fromhex(self.mac.replace(":", ""))
        self.cap_a, self.cap_b = f"qf{tag}a", f"qf{tag}b"
        self._frames: deque[tuple[float, bytes]] = deque()  # (kernel arrival stamp, frame)
        self._stopped_at: float | None = None
        self._release = threading.Event()
        self._done = threading.Event()
        self.forwarded = 0
        self._thread: threading.Thread | None = None
        self._rx: socket.socket | None = None
        self._txs: list[socket.socket] = []
        self._bridge_mac = b""

    def start(self) -> None:
        try:
            with IPRoute() as ip:
                # A capture link left by an agent that died mid-migration has our name.
                _del_link(ip, self.cap_a)
                ip.link("add", ifname=self.cap_a, kind="veth", peer={"ifname": self.cap_b})
                for name in (self.cap_a, self.cap_b):
                    (idx,) = ip.link_lookup(ifname=name)
                    ip.link("set", index=idx, state="up")
                # Ready before the switchover: opened at the release they took 20-30 ms
                # (netlink from Python), and the replay then reached the destination after its
                # guest had resumed instead of waiting in its tap (measured).
                for name in self._uplinks(ip):
                    self._txs.append(_packet_socket(name, receive=False))
                self._bridge_mac = _mac_of(ip, self.bridge)
            if not self._txs:
                log.warning(
                    "no uplink on %s: late frames of %s cannot be forwarded", self.bridge, self.mac
                )
            self._rx = _packet_socket(self.cap_b, receive=True)
            # Each frame's arrival as the kernel stamped it, not when this thread got to it.
            self._rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            with contextlib.suppress(OSError):  # needs CAP_NET_ADMIN; the default still works
                self._rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            # Short: a release must turn into replayed frames within a few milliseconds.
            self._rx.settimeout(0.002)
            prepare_tap(self.tap)
            self._remove_mirror()  # one left by an earlier attempt
            _tc(
                "filter",
                "add",
                "dev",
                self.tap,
                "egress",
                "pref",
                MIRROR_PREF,
                "protocol",
                "all",
                "u32",
                "match",
                "u32",
                "0",
                "0",
                "action",
                "mirred",
                "egress",
                "mirror",
                "dev",
                self.cap_a,
            )
            thread = threading.Thread(target=self._run, name=f"fwd-{self.tap}", daemon=True)
            thread.start()
            self._thread = thread
        except BaseException:
            self.close()
            raise

    def vm_stopped(self, wall_time: float) -> None:
        """QEMU's STOP event time (wall clock): frames captured after it were never consumed."""
        self._stopped_at = wall_time

    def release(self) -> None:
        """The destination has been told to take the traffic: start replaying."""
        self._release.set()

    def _uplinks(self, ip: IPRoute) -> list[str]:
        """The bridge's ports that lead off the host: not VM taps, not our capture links."""
        (br_index,) = ip.link_lookup(ifname=self.bridge)
        names = []
        for link in ip.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            if link.get_attr("IFLA_MASTER") == br_index and not name.startswith(("qm", "qf")):
                names.append(name)
        return names

    def _run(self) -> None:
        assert self._rx is not None
        rx = self._rx
        deadline: float | None = None
        try:
            while not self._done.is_set():
                with contextlib.suppress(TimeoutError, OSError):
                    frame, anc, _, _ = rx.recvmsg(70000, socket.CMSG_SPACE(16))
                    # Only frames addressed to the VM itself: replaying a broadcast would
                    # flood it back into the tap and round again.
                    if frame[VNET_HDR_LEN : VNET_HDR_LEN + 6] == self._mac_bytes:
                        self._frames.append((_stamp(anc), frame))
                now = time.time()
                while self._frames and self._frames[0][0] < now - KEEP_S:
                    self._frames.popleft()
                if not self._release.is_set() or self._stopped_at is None:
                    continue
                if deadline is None:
                    deadline = time.monotonic() + FORWARD_FOR_S
                cutoff = self._stopped_at - MARGIN_S
                while self._frames:
                    t, frame = self._frames.popleft()
                    if t >= cutoff:
                        self._send(frame)
                if time.monotonic() > deadline:
                    break
        finally:
            # The thread owns its sockets once it runs: close() never pulls one away from
            # under a send or a receive.
            for s in (rx, *self._txs):
                s.close()
            self._txs = []
            self._rx = None

    def _send(self, frame: bytes) -> None:
        # Straight out of the uplinks, not through the bridge: the local bridge may still send
        # the VM's MAC to its tap (steering pins it there). The client's source MAC, sent from
        # here, would teach the switches that the client lives behind this host; use the
        # bridge's own MAC instead (the guest's IP stack does not look at a frame's source MAC).
        src = VNET_HDR_LEN + 6
        frame = frame[:src] + self._bridge_mac + frame[src + 6 :]
        for tx in self._txs:
            # Never block: a full uplink queue drops the frame as a switch would.
            with contextlib.suppress(OSError):
                tx.send(frame, socket.MSG_DONTWAIT)
                self.forwarded += 1

    def _remove_mirror(self) -> None:
        with contextlib.suppress(OSError):  # none there
            _tc("filter", "del", "dev", self.tap, "egress", "pref", MIRROR_PREF)

    def close(self) -> None:
        """Remove the mirror and the capture veth; safe to call more than once."""
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self._remove_mirror()
        if self._thread is None:  # never ran: the sockets are still ours to close
            for s in (self._rx, *self._txs):
                if s is not None:
                    s.close()
            self._txs = []
            self._rx = None
        try:
            with IPRoute() as ip:
                _del_link(ip, self.cap_a)
        except Exception as exc:  # netlink: log it, the other NICs' forwarders still close
            log.warning("could not remove the capture link %s: %s", self.cap_a, exc)
        if self.forwarded:
            log.info("forwarded %d late frames for %s", self.forwarded, self.mac)
