"""Client side of the built guest's services: echo (7000), memory check (7001), disk (7002)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

ECHO_PORT, MEM_PORT, DISK_PORT = 7000, 7001, 7002
GAP_RECORD_S = 0.02  # gaps above this are kept with their time, to attribute them later


class ProbeError(Exception):
    """The guest did not answer as its protocol says."""


def echo_once(address: str, payload: bytes = b"qmotion\n", timeout_s: float = 2.0) -> float:
    """One connect-send-receive round trip; returns the round-trip time in seconds."""
    start = time.monotonic()
    with socket.create_connection((address, ECHO_PORT), timeout=timeout_s) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                raise ProbeError(f"{address}: echo connection closed after {len(got)} bytes")
            got += chunk
    if got != payload:
        raise ProbeError(f"{address}: echo returned {got!r}, sent {payload!r}")
    return time.monotonic() - start


def wait_echo(address: str, timeout_s: float = 60.0) -> float:
    """Wait until the guest answers echo; returns the seconds waited."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout_s:
        try:
            echo_once(address, timeout_s=1.0)
            return time.monotonic() - start
        except (OSError, ProbeError) as exc:
            last = exc
            time.sleep(0.2)
    raise ProbeError(f"{address}: no echo within {timeout_s:.0f} s: {last}")


def _connect(address: str, port: int, timeout_s: float, wait_s: float) -> socket.socket:
    """Connect, retrying while the service is not listening yet (a guest still booting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return socket.create_connection((address, port), timeout=timeout_s)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def query(
    address: str, port: int, command: str, timeout_s: float = 120.0, wait_s: float = 30.0
) -> dict[str, Any]:
    with _connect(address, port, timeout_s, wait_s) as s:
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        result: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise ProbeError(f"{address}:{port} {command}: not JSON: {data[:200]!r}") from exc
    return result


def mem_check(address: str) -> dict[str, Any]:
    """Run the guest's full memory-integrity check now; ``consistent`` tells the verdict."""
    return query(address, MEM_PORT, "check")


def mem_status(address: str) -> dict[str, Any]:
    return query(address, MEM_PORT, "status")


def disk_verify(address: str) -> dict[str, Any]:
    """Read back every acknowledged disk record; ``intact`` tells the verdict."""
    return query(address, DISK_PORT, "verify")


def disk_status(address: str) -> dict[str, Any]:
    return query(address, DISK_PORT, "status")


@dataclass
class StreamResult:
    sent: int
    received: int
    max_gap_ms: float
    duration_s: float
    errors: list[str]
    gaps: list[tuple[float, float]] = field(default_factory=list)

    def max_gap_between(self, start: float, end: float) -> float:
        """Largest gap (ms) whose reply came in [start, end] (monotonic clock)."""
        return max((g for t, g in self.gaps if start <= t <= end), default=0.0)

    @property
    def survived(self) -> bool:
        return not self.errors and self.received == self.sent


def echo_stream(
    address: str,
    duration_s: float,
    interval_s: float = 0.005,
    stop_file: str | None = None,
) -> StreamResult:
    """Hold one TCP session and ping-pong small messages through it.

    The largest gap between consecutive replies is the blackout an application would see
    (it includes any TCP retransmission wait). Ends after ``duration_s`` or when ``stop_file``
    appears.
    """
    import os

    errors: list[str] = []
    gaps: list[tuple[float, float]] = []
    sent = received = 0
    max_gap = 0.0
    start = time.monotonic()
    with socket.create_connection((address, ECHO_PORT), timeout=10.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        last_reply = time.monotonic()
        while time.monotonic() - start < duration_s:
            if stop_file and os.path.exists(stop_file):
                break
            msg = f"{sent:012d}\n".encode()
            try:
                s.sendall(msg)
                sent += 1
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(len(msg) - len(got))
                    if not chunk:
                        raise ProbeError("connection closed by the guest")
                    got += chunk
            except (OSError, ProbeError) as exc:
                errors.append(f"after {received} replies: {exc}")
                break
            now = time.monotonic()
            if got != msg:
                errors.append(f"reply {received} corrupt: {got!r}")
                break
            received += 1
            gap = now - last_reply
            max_gap = max(max_gap, gap)
            if gap > GAP_RECORD_S:
                gaps.append((now, round(gap * 1000, 1)))
            last_reply = now
            time.sleep(interval_s)
    return StreamResult(
        sent, received, round(max_gap * 1000, 1), round(time.monotonic() - start, 3), errors, gaps
    )
