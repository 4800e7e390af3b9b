"""Which frames on a destination tap mark the switchover's end."""

from __future__ import annotations

import socket
import threading
import time

from qmotion.agent.network.tapwatch import CLIENT, GUEST, PACKET_OUTGOING, TapWatch, classify

GUEST_MAC = bytes.fromhex("525400cd4f4c")
OTHER = bytes.fromhex("02aabbccddee")
BCAST = b"\xff" * 6
IPV4, ARP, RARP = b"\x08\x00", b"\x08\x06", b"\x80\x35"
PACKET_HOST = 0


def frame(dst: bytes, src: bytes, ethertype: bytes) -> bytes:
    return dst + src + ethertype + b"\x00" * 46


MACS = {GUEST_MAC}


def test_a_frame_delivered_to_the_guest_is_the_clients() -> None:
    assert classify(frame(GUEST_MAC, OTHER, IPV4), PACKET_OUTGOING, MACS) == CLIENT
    # Flooded to the tap but not for the guest (another VM's, a broadcast): not a mark.
    assert classify(frame(OTHER, BCAST[:6], IPV4), PACKET_OUTGOING, MACS) is None
    assert classify(frame(BCAST, OTHER, ARP), PACKET_OUTGOING, MACS) is None


def test_a_frame_from_the_guest_is_the_guests_but_not_qemus_announce() -> None:
    assert classify(frame(OTHER, GUEST_MAC, IPV4), PACKET_HOST, MACS) == GUEST
    assert classify(frame(BCAST, GUEST_MAC, ARP), PACKET_HOST, MACS) == GUEST
    # QEMU's announce-self after the resume carries the guest's MAC: it is not the guest.
    assert classify(frame(BCAST, GUEST_MAC, RARP), PACKET_HOST, MACS) is None
    assert classify(frame(OTHER, OTHER, IPV4), PACKET_HOST, MACS) is None
    assert classify(b"\x00" * 10, PACKET_HOST, MACS) is None


def test_a_real_packet_socket_sees_both_directions_after_the_resume() -> None:
    """On loopback every frame has the all-zero MAC, goes out and comes in: both marks,
    through the sockets the agent opens (a protocol given in the wrong byte order sees none)."""
    got: dict[str, float] = {}
    done = threading.Event()

    def record(kind: str, at: float) -> None:
        got[kind] = at
        if len(got) == 2:
            done.set()

    watch = TapWatch(["lo"], ["00:00:00:00:00:00"], record)
    try:
        before = time.monotonic()
        watch.resumed(time.time())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for _ in range(20):
                u.sendto(b"x", ("127.0.0.1", 9))
                if done.wait(0.1):
                    break
        assert done.is_set(), got
        assert set(got) == {CLIENT, GUEST}
        assert all(before <= at <= time.monotonic() for at in got.values())
    finally:
        watch.close()
