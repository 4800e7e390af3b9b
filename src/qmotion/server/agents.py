"""The manager's one seam to its host agents: every agent client is built here.

Tests (and fuzzing) hand the manager a connector whose transport is an in-process agent
(httpx ``MockTransport``), so the real inventory, port and task runner run without root, a
network or QEMU. Agent errors are translated where they are used: the inventory turns them into
HTTP statuses (``agent_errors``), the migration port into step errors.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import httpx

from qmotion.client.agent import AgentClient
from qmotion.client.errors import ApiError, ClientError, Unreachable
from qmotion.pki import ManagerTls
from qmotion.server.errors import Conflict, Invalid, NotFound, Upstream

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

    def stream_put(
        self, url: str, token: str, path: str, params: dict[str, str]
    ) -> Callable[[AsyncIterator[bytes]], Awaitable[httpx.Response]]:
        """A PUT whose body is streamed through (an image upload): the same credentials and
        transport as ``client``; the answer is the caller's to read."""

        async def put(body: AsyncIterator[bytes]) -> httpx.Response:
            transport = self._transport(url) if self._transport is not None else None
            verify: ssl.SSLContext | bool = True
            if url.startswith("https:") and self._tls is not None and transport is None:
                verify = ssl.create_default_context(cafile=str(self._tls.ca_file))
                verify.load_cert_chain(str(self._tls.cert_file), str(self._tls.key_file))
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(
                base_url=url,
                headers=headers,
                verify=verify,
                timeout=httpx.Timeout(3600.0, connect=10.0),
                transport=transport,  # type: ignore[arg-type]
            ) as client:
                try:
                    return await client.put(path, params=params, content=body)
                except httpx.TransportError as exc:
                    raise Unreachable(url, str(exc) or type(exc).__name__) from exc

        return put


@contextmanager
def agent_errors(host: str, vm: str | None = None) -> Iterator[None]:
    """Agent refusals keep their status (409/422/404); anything else is an upstream failure."""
    try:
        yield
    except ApiError as exc:
        d = exc.detail
        cls = {404: NotFound, 409: Conflict, 422: Invalid}.get(exc.status, Upstream)
        raise cls(
            f"host {host}: {d.message}",
            code=d.code,
            vm=d.vm or vm,
            host=host,
            field=d.field,
            qmp_class=d.qmp_class,
        ) from exc
    except ClientError as exc:
        raise Upstream(f"host {host}: {exc}", vm=vm, host=host) from exc
