"""The shared HTTP plumbing of the typed clients: auth, error translation, model parsing."""

from __future__ import annotations

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
        return True
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def auth_headers(token: str) -> dict[str, str]:
    """A bearer token's header; none for an empty token (mutual TLS instead)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


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
    ) -> None:
        """``ca_file``: the cluster CA an https:// service is checked against (None: the
        system's trust store); ``cert``: a client certificate and key for mutual TLS (an
        agent's control API). An empty ``token`` sends no Authorization header."""
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            verify=tls if tls is not None else tls_verify(ca_file, cert),
            headers=auth_headers(token),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}{path}", str(exc) or type(exc).__name__) from exc
        if resp.status_code >= 400:
            try:
                detail = ErrorBody.model_validate_json(resp.content).error
            except ValidationError:
                detail = ErrorDetail(
                    code="http_error", message=resp.text[:500] or resp.reason_phrase
                )
            raise error_for(resp.status_code, detail)
        return resp

    def call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        resp = self.request(method, path, **kwargs)
        return TypeAdapter(model).validate_json(resp.content)


def dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_none=True)
