"""The manager's one seam to its host agents: every agent client is built here.

Tests (and fuzzing) hand the manager a connector whose transport is an in-process agent
(httpx ``MockTransport``), so the real inventory, port and task runner run without root, a
network or QEMU. Agent errors are translated where they are used: the inventory turns them into
HTTP statuses (``inventory.agent_errors``), the migration port into step errors.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from qmotion.client.agent import AgentClient
from qmotion.pki import ManagerTls

TransportFactory = Callable[[str], httpx.BaseTransport]


class AgentConnector:
    """Builds the client for one agent; ``transport`` (given the agent's URL) replaces the
    network, for tests."""

    def __init__(
        self, transport: TransportFactory | None = None, tls: ManagerTls | None = None
    ) -> None:
        self._transport = transport
        self._tls = tls

    def client(self, url: str, token: str, timeout_s: float = 120.0) -> AgentClient:
        """An https agent (one that joined) is called by the manager's client certificate
        and checked against the cluster CA; a plain-http one by its token."""
        transport = self._transport(url) if self._transport is not None else None
        if url.startswith("https:") and self._tls is not None and transport is None:
            t = self._tls
            return AgentClient(
                url,
                token,
                timeout_s=timeout_s,
                ca_file=str(t.ca_file),
                cert=(str(t.cert_file), str(t.key_file)),
            )
        return AgentClient(url, token, timeout_s=timeout_s, transport=transport)
