"""The path between two agents, measured: RTT by small requests, bandwidth by a timed upload.

The migration stream takes the same route (agents and QEMU listen on the host's address), so
what one HTTP upload carries is a lower bound of what one migration stream will: the ladder
then corrects it from QEMU's own throughput once the stream runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx

from qmotion.agent.errors import OperationFailed
from qmotion.api.migration import PathProbe, PathProbeRequest

CHUNK = b"\0" * (1 << 20)
RTT_SAMPLES = 3


async def probe(req: PathProbeRequest) -> PathProbe:
    headers = {"Authorization": f"Bearer {req.peer.token}"}
    try:
        client = httpx.AsyncClient(base_url=req.peer.url, headers=headers, timeout=10.0)
    except (httpx.InvalidURL, ValueError) as exc:
        raise OperationFailed(f"cannot probe {req.peer.url!r}: {exc}") from exc
    async with client:
        try:
            await client.get("/healthz")  # the connection, set up before timing
            rtts = []
            for _ in range(RTT_SAMPLES):
                start = time.monotonic()
                await client.get("/healthz")
                rtts.append(time.monotonic() - start)
            sent = 0
            start = time.monotonic()

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                while time.monotonic() - start < req.seconds and sent < req.max_bytes:
                    sent += len(CHUNK)
                    yield CHUNK

            resp = await client.post("/v1/net/sink", content=body())
            elapsed = time.monotonic() - start
            resp.raise_for_status()
            received = int(resp.json().get("bytes", 0))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError) as exc:
            raise OperationFailed(f"probing the path to {req.peer.url} failed: {exc}") from exc
    return PathProbe(
        rtt_ms=round(min(rtts) * 1000, 3),
        bandwidth_bps=received / max(elapsed, 1e-6),
        bytes=received,
        seconds=round(elapsed, 3),
    )
