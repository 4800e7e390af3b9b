"""The source agent's one seam to the destination agent: every peer client is built here.

At switchover the source calls the destination's agent itself (``steer``), so the pause costs
one LAN round trip; once its QEMU completed, it gives the paused destination the word to run
(``finish_on_peer``). ``transport`` (given the peer's URL) replaces the network, for tests, the
way the manager's agent connector does (``qmotion.server.agents``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable

import httpx

from qmotion.agent.tls import TlsStore
from qmotion.api.migration import PeerRef
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.monitor import Monitor

log = logging.getLogger(__name__)
PeerTransport = Callable[[str], httpx.AsyncBaseTransport]
PEER_TIMEOUT_S = 2.0
POSTMIGRATE_WAIT_S = 2.0


class PeerConnector:
    """Builds the client for the destination agent of one migration: over https with this
    host's certificate (mutual TLS, the peer's own port), over plain http with the token the
    manager passed on."""

    def __init__(self, tls: TlsStore | None, transport: PeerTransport | None = None) -> None:
        self.tls = tls
        self._transport = transport

    async def client(self, peer: PeerRef | None) -> httpx.AsyncClient | None:
        """A client with its connection already open, or None: without one the switchover
        still happens (QEMU's announce then steers the network)."""
        if peer is None:
            return None
        transport = self._transport(peer.url) if self._transport is not None else None
        if peer.url.startswith("https:"):
            if self.tls is None or not self.tls.ready:
                log.warning("no certificate to call the destination at switchover with")
                return None
            try:
                ctx = await asyncio.to_thread(self.tls.client_context)
            except (ssl.SSLError, OSError) as exc:
                # The switchover still happens; QEMU's announce then steers the network.
                log.error("no TLS client context for the switchover call: %s", exc)
                return None
            client = httpx.AsyncClient(
                base_url=peer.url, verify=ctx, timeout=PEER_TIMEOUT_S, transport=transport
            )
        else:
            client = httpx.AsyncClient(
                base_url=peer.url,
                headers={"Authorization": f"Bearer {peer.token}"},
                timeout=PEER_TIMEOUT_S,
                transport=transport,
            )
        # Open the connection now so the switchover pays no TCP handshake.
        with contextlib.suppress(httpx.HTTPError):
            await client.get("/healthz")
        return client


async def finish_on_peer(
    mon: Monitor, client: httpx.AsyncClient, peer: PeerRef, migration: str
) -> str | None:
    """The word to the destination agent that ``migration`` completed here: its paused VM
    runs. Given only once this QEMU is in postmigrate (it never resumes by itself; QEMU sets
    it a moment after it reports completed). Returns why it was not given, or None."""
    try:
        deadline = time.monotonic() + POSTMIGRATE_WAIT_S
        state = await mon.status()
        while state == "finish-migrate" and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            state = await mon.status()
    except HypervisorError as exc:
        return f"the source's run state is unknown ({exc}): no word given"
    if state != "postmigrate":
        return f"the source is {state}, not postmigrate: no word given"
    base = "/v1/peer" if peer.url.startswith("https:") else "/v1"
    try:
        resp = await client.post(
            f"{base}/vms/{peer.vm}/migration/finish", params={"migration": migration}
        )
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__
    if resp.status_code >= 400:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"
    return None
