"""The shared HTTP plumbing of the typed clients: auth, error translation, model parsing."""

from __future__ import annotations

import functools
import ssl
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.client.errors import Unreachable, error_for

M = TypeVar("M")


def tls_verify(ca_file: str | None, cert: tuple[str, str] | None) -> ssl.SSLContext | bool:
    """httpx's ``verify``: the system's trust store, or ``ca_file`` (and a client
    certificate and key for mutual TLS)."""
    if not ca_file and not cert:
        return _system_context()
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


@functools.cache
def _system_context() -> ssl.SSLContext:
    """Made once: loading the system's trust store costs ~20 ms of CPU, and the manager
    builds a client per agent call (a thousand hosts' refresh would spend seconds on it)."""
    return ssl.create_default_context()


def auth_headers(token: str) -> dict[str, str]:
    """A bearer token's header; none for an empty token (mutual TLS instead)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


# Requests that change nothing: sent again to another replica whatever broke.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BaseClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        ca_file: str | None = None,
        cert: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        """``base_url``: one URL, or several separated by commas (replicas of the manager:
        a request that cannot connect to one goes to the next, see ``request``);
        ``ca_file``: the cluster CA an https:// service is checked against (None: the
        system's trust store); ``cert``: a client certificate and key for mutual TLS (an
        agent's control API). An empty ``token`` sends no Authorization header. ``http``: a
        connection pool for ``base_url`` shared with other clients (kept open: its owner
        closes it); each request then carries this client's timeout."""
        self.urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no URL given")
        self.base_url = self.urls[0]
        self._shared = http is not None
        self._timeout = timeout_s
        if http is not None:
            if len(self.urls) > 1:
                raise ValueError("a shared connection pool serves one URL")
            self._http = http
            return
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            verify=tls if tls is not None else tls_verify(ca_file, cert),
            headers=auth_headers(token),
        )

    def close(self) -> None:
        if not self._shared:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Through the URL that answered last; when it cannot be reached, the next one. A
        request that may have reached a server (it timed out or broke after connecting) is
        sent again only if it is a read: a second POST could start a second task."""
        tried: list[str] = []
        for _ in range(len(self.urls)):
            try:
                if self._shared:
                    kwargs.setdefault("timeout", self._timeout)
                resp = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as exc:
                tried.append(f"{self.base_url}: {str(exc) or type(exc).__name__}")
                unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if len(self.urls) == 1 or not (unsent or method in SAFE_METHODS):
                    raise Unreachable(f"{self.base_url}{path}", "; ".join(tried)) from exc
                self._next_url()
        else:
            raise Unreachable(f"{self.base_url}{path}", "; ".join(tried))
        if resp.status_code >= 400:
            try:
                detail = ErrorBody.model_validate_json(resp.content).error
            except ValidationError:
                detail = ErrorDetail(
                    code="http_error", message=resp.text[:500] or resp.reason_phrase
                )
            raise error_for(resp.status_code, detail)
        return resp

    def _next_url(self) -> None:
        self.base_url = self.urls[(self.urls.index(self.base_url) + 1) % len(self.urls)]
        self._http.base_url = httpx.URL(self.base_url)

    def call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        resp = self.request(method, path, **kwargs)
        return TypeAdapter(model).validate_json(resp.content)


def dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)
