"""The path between two agents, measured: RTT by small requests, bandwidth by a timed upload.

The agent listens on each of its migration addresses too, so a probe to a migration address
takes the route the migration stream will: what one HTTP upload carries is a lower bound of
what one stream will, and the ladder corrects it from QEMU's own throughput once it runs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator

import httpx

from qmotion.agent.errors import OperationFailed, PeerUnreachable
from qmotion.api.migration import PathProbe, PathProbeRequest

CHUNK = b"\0" * (1 << 20)
RTT_SAMPLES = 3
CONNECT_TIMEOUT_S = 2.0  # a candidate that takes longer to answer is taken as unreachable


def route_interface(address: str) -> tuple[str | None, int | None]:
    """The interface this host sends to ``address`` through, and its MTU."""

    def ip_json(*args: str) -> list[dict[str, object]]:
        proc = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False)
        try:
            got = json.loads(proc.stdout or "[]")
        except ValueError:
            return []
        return got if isinstance(got, list) else []

    routes = ip_json("route", "get", address)
    dev = routes[0].get("dev") if routes else None
    if not isinstance(dev, str):
        return None, None
    if routes[0].get("gateway"):
        # Routed: a router between the ends fragments or reports the path MTU; only two ends
        # of one segment must agree.
        return dev, None
    links = ip_json("link", "show", "dev", dev)
    mtu = links[0].get("mtu") if links else None
    return dev, mtu if isinstance(mtu, int) else None


def _connect_rtts(host: str, port: int) -> list[float]:
    out = []
    for _ in range(RTT_SAMPLES):
        start = time.monotonic()
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            out.append(time.monotonic() - start)
    return out


def _with_host(url: str, address: str) -> str:
    return str(httpx.URL(url).copy_with(host=address))


async def probe(req: PathProbeRequest, tls: ssl.SSLContext | None = None) -> PathProbe:
    """``tls``: this host's client context, for a peer's mutual-TLS port (an https URL)."""
    headers = {"Authorization": f"Bearer {req.peer.token}"} if req.peer.token else {}
    secure = req.peer.url.startswith("https:")
    if secure and tls is None:
        raise OperationFailed("no certificate here to reach the peer's mutual-TLS port with")
    verify: ssl.SSLContext | bool = tls if secure and tls is not None else True
    try:
        urls = [_with_host(req.peer.url, str(a)) for a in req.candidates] or [req.peer.url]
    except (httpx.InvalidURL, ValueError) as exc:
        raise OperationFailed(f"cannot probe {req.peer.url!r}: {exc}") from exc
    unreachable: list[str] = []
    timeout = httpx.Timeout(10.0, connect=CONNECT_TIMEOUT_S)
    for url in urls:
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=timeout, verify=verify
        ) as client:
            try:
                await client.get("/healthz")  # the connection, set up before timing
            except (httpx.TransportError, httpx.InvalidURL) as exc:
                unreachable.append(f"{httpx.URL(url).host}: {str(exc) or type(exc).__name__}")
                continue
            result = await _measure(client, req, url)
        result.unreachable = unreachable
        return result
    raise PeerUnreachable(f"no address of the peer answers: {'; '.join(unreachable)}")


async def _measure(client: httpx.AsyncClient, req: PathProbeRequest, url: str) -> PathProbe:
    parsed = httpx.URL(url)
    host = parsed.host
    try:
        # The kernel's handshake, not an HTTP request: a busy agent on either end would add
        # its own latency, and a LAN would look like a long path.
        rtts = await asyncio.to_thread(_connect_rtts, host, parsed.port or 80)
        sent = received = 0
        elapsed = 0.0
        if req.upload:
            start = time.monotonic()

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                while time.monotonic() - start < req.seconds and sent < req.max_bytes:
                    sent += len(CHUNK)
                    yield CHUNK

            # The peer port's sink takes certificates, the API's a token.
            sink = "/v1/peer/net/sink" if parsed.scheme == "https" else "/v1/net/sink"
            resp = await client.post(sink, content=body())
            elapsed = time.monotonic() - start
            resp.raise_for_status()
            received = int(resp.json().get("bytes", 0))
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError, OSError) as exc:
        raise OperationFailed(f"probing the path to {url} failed: {exc}") from exc
    ifname, mtu = await asyncio.to_thread(route_interface, host)
    return PathProbe(
        rtt_ms=round(min(rtts) * 1000, 3),
        bandwidth_bps=received / elapsed if elapsed > 0 else 0.0,
        bytes=received,
        seconds=round(elapsed, 3),
        address=host,
        local_ifname=ifname,
        local_mtu=mtu,
    )
