"""The late-frame forwarder against a real bridge, tap and uplink in a namespace of its own.

The tap's reader (QEMU in a migration) is this test: it reads some of the frames sent to the
VM's MAC and leaves the rest, as a QEMU that stopped would. After the stop and the release the
forwarder must send out of the uplink exactly the frames the reader never got, plus the last
two it read (QEMU may hold the last unread by the guest; one may have sat in the tap before
the mirror went on), and none of the earlier ones: each duplicate costs a just-resumed guest
time, each missing frame a TCP retransmission timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from qmotion.agent.forwarder import LateFrameForwarder
from qmotion.lab.netns import create_ns, run_in

pytestmark = pytest.mark.integration

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
VM_MAC = "52:54:00:12:34:56"
MARK = b"qmfwd"
PACKET_OUTGOING = 4
IGMP_QUIET = "net.ipv4.igmp_link_local_mcast_reports=0"


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"qmfwd{secrets.token_hex(3)}"
    create_ns(name)
    try:
        # The tap's frames are the test's alone: the bridge's own IGMP reports (sent when a
        # port comes up) would otherwise land in it at a random moment.
        subprocess.run(
            [*("ip", "netns", "exec", name), "sysctl", "-qw", IGMP_QUIET],
            check=True,
            capture_output=True,
        )
        _ip(name, "link", "add", "br0", "type", "bridge")
        _ip(name, "link", "set", "br0", "up")
        _ip(name, "tuntap", "add", "dev", "qmt0", "mode", "tap")
        _ip(name, "link", "set", "qmt0", "master", "br0", "up")
        _ip(name, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        _ip(name, "link", "set", "up0", "master", "br0", "up")
        _ip(name, "link", "set", "up1", "up")
        # The VM's MAC lives behind the tap, as the agent's bridge would have learnt.
        subprocess.run(
            ["bridge", "-n", name, "fdb", "add", VM_MAC, "dev", "qmt0", "master", "static"],
            check=True,
            capture_output=True,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _frame(n: int) -> bytes:
    dst = bytes.fromhex(VM_MAC.replace(":", ""))
    src = bytes.fromhex("020000000001")
    return dst + src + b"\x88\xb5" + MARK + struct.pack("!I", n) + b"\x00" * 40


def _number(frame: bytes) -> int | None:
    i = frame.find(MARK)
    return struct.unpack("!I", frame[i + 5 : i + 9])[0] if i >= 0 else None


def _scenario(sent: int, read: int) -> tuple[list[int], list[int]]:
    """In the namespace: frames 1..sent to the VM, ``read`` of them read off the tap, then the
    stop and the release; returns (numbers read, numbers replayed out of the uplink)."""
    tap = os.open("/dev/net/tun", os.O_RDWR)
    fw = LateFrameForwarder("qmt0", "br0", VM_MAC, secrets.token_hex(3))
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        # Attached, the tap has carrier: the bridge delivers to it.
        fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", b"qmt0", IFF_TAP | IFF_NO_PI))
        wire.bind(("up1", 0))
        time.sleep(0.2)  # the bridge port forwards once its carrier is seen
        fw.start()
        for n in range(1, sent + 1):
            wire.send(_frame(n))
        got: list[int] = []
        deadline = time.monotonic() + 5
        while len(got) < read and time.monotonic() < deadline:
            if select.select([tap], [], [], 0.1)[0]:
                data = os.read(tap, 4096)
                mine = _number(data)
                # Not the test's: the expected replay below would not hold.
                assert mine is not None, f"a stray frame in the tap: {data[:40].hex()}"
                got.append(mine)
        time.sleep(0.1)  # every frame has reached the tap and its mirror
        fw.vm_stopped(time.time())
        fw.release()
        replayed: list[int] = []
        wire.settimeout(0.05)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                data, addr = wire.recvfrom(4096)
                out = _number(data)
                if addr[2] != PACKET_OUTGOING and out is not None:
                    replayed.append(out)
        return got, replayed
    finally:
        fw.close()
        wire.close()
        os.close(tap)


@pytest.mark.parametrize(("sent", "read"), [(8, 4), (5, 0), (4, 4), (3, 1)])
def test_only_the_frames_the_guest_never_got_are_replayed(ns: str, sent: int, read: int) -> None:
    got, replayed = run_in(ns, lambda: _scenario(sent, read))
    assert got == list(range(1, read + 1))
    # The unread tail and the last two read: nothing earlier.
    assert replayed == list(range(max(read - 1, 1), sent + 1))
