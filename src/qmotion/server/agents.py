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

TransportFactory = Callable[[str], httpx.BaseTransport]


class AgentConnector:
    """Builds the client for one agent; ``transport`` (given the agent's URL) replaces the
    network, for tests."""

    def __init__(self, transport: TransportFactory | None = None) -> None:
        self._transport = transport

    def client(self, url: str, token: str, timeout_s: float = 120.0) -> AgentClient:
        transport = self._transport(url) if self._transport is not None else None
        return AgentClient(url, token, timeout_s=timeout_s, transport=transport)
