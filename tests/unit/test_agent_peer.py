"""The source agent's switchover call to the destination agent, through its one seam: the
peer connector, its network replaced by an httpx ``MockTransport``."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx

from qmotion.agent.migration.migrate import Migrations
from qmotion.agent.migration.outgoing import Outgoing
from qmotion.agent.migration.peer import PEER_TIMEOUT_S, PeerConnector
from qmotion.api.migration import OutgoingRequest, PeerRef

PLAIN = PeerRef(url="http://198.19.1.12:8600", token="s3cret", vm="vm1")


class Recorder:
    """The destination agent: records each request, answers ``steer`` with ``status``."""

    def __init__(self, status: int = 200, healthz_up: bool = True) -> None:
        self.status, self.healthz_up = status, healthz_up
        self.requests: list[httpx.Request] = []
        self.urls: list[str] = []

    def transport(self, url: str) -> httpx.AsyncBaseTransport:
        self.urls.append(url)
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/healthz":
            if not self.healthz_up:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(self.status, text="no such VM" if self.status >= 400 else "{}")


def test_a_plain_http_peer_gets_the_token_and_a_warm_connection() -> None:
    peer = Recorder()

    async def run() -> httpx.AsyncClient | None:
        client = await PeerConnector(None, peer.transport).client(PLAIN)
        if client is not None:
            await client.aclose()
        return client

    client = asyncio.run(run())
    assert client is not None
    assert peer.urls == [PLAIN.url]
    assert [r.url.path for r in peer.requests] == ["/healthz"]  # opened before switchover
    assert peer.requests[0].headers["authorization"] == "Bearer s3cret"
    assert client.timeout == httpx.Timeout(PEER_TIMEOUT_S)
    assert str(client.base_url).rstrip("/") == PLAIN.url


def test_an_unreachable_peer_still_gets_a_client() -> None:
    """The warm-up is best effort: the switchover call itself reports what failed."""
    peer = Recorder(healthz_up=False)

    async def run() -> bool:
        client = await PeerConnector(None, peer.transport).client(PLAIN)
        if client is None:
            return False
        await client.aclose()
        return True

    assert asyncio.run(run())


def test_no_peer_or_no_certificate_for_https_means_no_client() -> None:
    peer = Recorder()
    connector = PeerConnector(None, peer.transport)
    assert asyncio.run(connector.client(None)) is None
    tls_peer = PeerRef(url="https://198.19.1.12:8601", vm="vm1")
    assert asyncio.run(connector.client(tls_peer)) is None
    assert peer.requests == []


class OneVm:
    def spec(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(nics=[SimpleNamespace(mac="52:54:00:00:00:01")])


def _switchover(peer: Recorder) -> Outgoing:
    m = Migrations(OneVm(), peer_transport=peer.transport)  # type: ignore[arg-type]
    req = OutgoingRequest(uri="tcp:198.19.1.12:40000", peer=PLAIN)
    out = Outgoing(started_at=time.monotonic(), status="active")

    async def run() -> None:
        client = await m.src.peers.client(req.peer)
        assert client is not None
        await m.src._steer_peer("vm1", req, out, client, [])
        await client.aclose()

    asyncio.run(run())
    return out


def test_the_switchover_call_steers_the_destination_vm() -> None:
    peer = Recorder()
    out = _switchover(peer)
    steer = peer.requests[-1]
    assert (steer.method, steer.url.path) == ("POST", "/v1/vms/vm1/steer")
    assert json.loads(steer.content) == {"mac": ["52:54:00:00:00:01"]}
    assert out.steer_error is None and out.steer_ms is not None


def test_a_refused_switchover_call_is_reported_not_raised() -> None:
    out = _switchover(Recorder(status=409))
    assert out.steer_error == "HTTP 409: no such VM"
    assert out.steer_ms is not None
