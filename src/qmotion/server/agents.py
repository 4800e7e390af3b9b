"""The manager's one seam to its host agents: every agent client is built here.

Tests (and fuzzing) hand the manager a connector whose transport is an in-process agent
(httpx ``MockTransport``), so the real inventory, port and task runner run without root, a
network or QEMU. Agent errors are translated where they are used: the inventory turns them into
HTTP statuses (``agent_errors``), the migration port into step errors.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import httpx

from qmotion.client.agent import AgentClient
from qmotion.client.base import auth_headers, tls_verify
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
        self._ctx: ssl.SSLContext | None = None
        # One keep-alive pool per joined agent: a new mutual-TLS connection per call cost
        # ~50 ms of a migration's start here, and a migration polls its source every 0.5 s.
        self._pools: dict[tuple[str, str], httpx.Client] = {}
        self._pools_lock = threading.Lock()

    def _mtls(self, url: str) -> ssl.SSLContext | None:
        """The TLS context (the cluster CA, the manager's client certificate) for an https
        agent (one that joined) on the real network; None: a plain-http one (its token) or a
        test transport. Made once: the files change only with a manager restart, and every
        call to an agent (a migration's polls too) would read and parse them again."""
        if not url.startswith("https:") or self._tls is None or self._transport is not None:
            return None
        if self._ctx is None:
            t = self._tls
            ctx = tls_verify(str(t.ca_file), (str(t.cert_file), str(t.key_file)))
            assert isinstance(ctx, ssl.SSLContext)
            self._ctx = ctx
        return self._ctx

    def client(self, url: str, token: str, timeout_s: float = 120.0) -> AgentClient:
        if (ctx := self._mtls(url)) is not None:
            return AgentClient(url, token, timeout_s=timeout_s, http=self._pool(url, token, ctx))
        transport = self._transport(url) if self._transport is not None else None
        return AgentClient(url, token, timeout_s=timeout_s, transport=transport)

    def _pool(self, url: str, token: str, ctx: ssl.SSLContext) -> httpx.Client:
        with self._pools_lock:
            pool = self._pools.get((url, token))
            if pool is None:
                # A new token for this agent: the old one's pool is dropped (not closed: a
                # call may still be on it; its idle connections go with it).
                for key in [k for k in self._pools if k[0] == url]:
                    del self._pools[key]
                pool = httpx.Client(
                    base_url=url,
                    verify=ctx,
                    headers=auth_headers(token),
                    # Idle connections go before an agent's server would drop them.
                    limits=httpx.Limits(max_keepalive_connections=8, keepalive_expiry=4.0),
                )
                self._pools[(url, token)] = pool
        return pool

    def stream_put(
        self, url: str, token: str, path: str, params: dict[str, str]
    ) -> Callable[[AsyncIterator[bytes]], Awaitable[httpx.Response]]:
        """A PUT whose body is streamed through (an image upload): the same credentials and
        transport as ``client``; the answer is the caller's to read."""

        async def put(body: AsyncIterator[bytes]) -> httpx.Response:
            ctx = self._mtls(url)
            async with httpx.AsyncClient(
                base_url=url,
                headers=auth_headers(token),
                verify=ctx if ctx is not None else True,
                timeout=httpx.Timeout(3600.0, connect=10.0),
                transport=self._transport(url) if self._transport is not None else None,  # type: ignore[arg-type]
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
