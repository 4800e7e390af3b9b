"""The manager keeps one keep-alive pool per joined agent (issue 27: a new mutual-TLS
connection per call cost ~50 ms of each migration's start): clients share it, each request
carries its own client's timeout, and closing a client leaves the pool to the others."""

from __future__ import annotations

import ssl

import httpx
import pytest

from qmotion.client.agent import AgentClient
from qmotion.server.agents import AgentConnector

URL = "https://h1.test:8100"


def test_a_shared_pool_outlives_its_clients_and_each_request_has_its_timeout() -> None:
    seen: list[object] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "ok", "host": "h1"})

    pool = httpx.Client(base_url=URL, transport=httpx.MockTransport(handle))
    with AgentClient(URL, "", timeout_s=3.0, http=pool) as quick:
        quick.request("GET", "/healthz")
    assert not pool.is_closed
    with AgentClient(URL, "", timeout_s=30.0, http=pool) as slow:
        slow.request("GET", "/healthz")
    assert [t["read"] for t in seen] == [3.0, 30.0]  # type: ignore[index]
    with pytest.raises(ValueError, match="one URL"):
        AgentClient(f"{URL},https://h2.test:8100", "", http=pool)


def test_the_connector_gives_one_pool_per_agent_and_a_new_one_for_a_new_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = AgentConnector()
    ctx = ssl.create_default_context()
    monkeypatch.setattr(conn, "_mtls", lambda url: ctx)
    a, b = conn.client(URL, "", 30.0), conn.client(URL, "", 5.0)
    other = conn.client("https://h2.test:8100", "", 30.0)
    assert a._http is b._http and a._http is not other._http
    a.close()
    assert not b._http.is_closed
    rotated = conn.client(URL, "new-token", 30.0)
    assert rotated._http is not b._http
    assert conn.client(URL, "new-token", 30.0)._http is rotated._http
