"""Steering a VM's traffic to this host at switchover, before its QEMU runs here.

QEMU's own announce (RARP) is queued while the destination VM is not yet running, so frames for
the VM keep going to the paused source, where they are lost when the source exits; the client's
TCP then waits for its retransmission timeout (200 ms minimum). Steering first makes switches
learn the VM's MAC on this host's uplink while the source is paused: frames then wait in this
host's tap queue and reach the guest as soon as it resumes here.
"""

from __future__ import annotations

import socket
import struct

from pyroute2 import IPRoute

ETH_P_RARP = 0x8035
NTF_MASTER = 0x04
NUD_REACHABLE = 0x02


def _rarp(mac: bytes) -> bytes:
    """A RARP request from ``mac``, as QEMU's own announce builds it."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
    return (eth + body).ljust(60, b"\0")


class Steerer:
    """Prepared at incoming time (sockets open, frames built) so that steering at switchover
    costs well under a millisecond: opening an AF_PACKET socket alone takes ~15 ms here."""

    def __init__(self, macs: list[str], taps: list[str], bridges: list[str]) -> None:
        self._ip = IPRoute()
        self._entries: list[tuple[int, str]] = []
        self._frames: list[tuple[socket.socket, bytes]] = []
        try:
            for mac, tap in zip(macs, taps, strict=True):
                (idx,) = self._ip.link_lookup(ifname=tap)
                self._entries.append((idx, mac))
            for mac, bridge in zip(macs, bridges, strict=True):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                s.bind((bridge, 0))
                self._frames.append((s, _rarp(bytes.fromhex(mac.replace(":", "")))))
        except BaseException:
            self.close()
            raise

    def fire(self) -> None:
        """Point this host's bridge and the switches beyond it at the VM's taps."""
        for idx, mac in self._entries:
            # Local bridge first: it may have learned the MAC on the uplink while the VM ran
            # elsewhere, and would then drop frames arriving there for it.
            self._ip.fdb("replace", ifindex=idx, lladdr=mac, state=NUD_REACHABLE, flags=NTF_MASTER)
        for sock, frame in self._frames:
            sock.send(frame)

    def close(self) -> None:
        for sock, _ in self._frames:
            sock.close()
        self._frames.clear()
        self._ip.close()
