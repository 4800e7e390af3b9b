"""A joining host's two calls to the manager, before it has any credentials of its own."""

from __future__ import annotations

import ssl

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pydantic import ValidationError

from qmotion.api.enrol import JoinAnswer, JoinRequest
from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.client.base import dump
from qmotion.client.errors import ClientError, Unreachable, error_for


def fingerprint(cert_pem: str) -> str:
    """``sha256:HEX`` of a certificate's DER (what ``host add`` prints as ``--ca-hash``)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


class CaMismatch(ClientError):
    """The manager showed a CA other than the one ``--ca-hash`` names: nothing was sent."""


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        try:
            detail = ErrorBody.model_validate_json(resp.content).error
        except ValidationError:
            detail = ErrorDetail(code="http_error", message=resp.text[:500])
        raise error_for(resp.status_code, detail)
    return resp


def pinned_ca(manager_url: str, ca_hash: str, timeout_s: float = 30.0) -> str:
    """The cluster CA, read without trusting anything yet and accepted only if its hash is
    ``ca_hash`` (what ``host add`` printed on the manager)."""
    try:
        # Not verified here on purpose: the hash check below is the verification.
        resp = httpx.get(f"{manager_url}/v1/join/ca", verify=False, timeout=timeout_s)
    except httpx.TransportError as exc:
        raise Unreachable(manager_url, str(exc) or type(exc).__name__) from exc
    ca_pem: str = _check(resp).json()["ca_pem"]
    seen = fingerprint(ca_pem)
    if seen.lower() != ca_hash.lower():
        raise CaMismatch(
            f"the manager at {manager_url} shows CA {seen}, not {ca_hash}: refusing to join "
            "(a wrong address, or someone in between)"
        )
    return ca_pem


def join(manager_url: str, ca_pem: str, req: JoinRequest, timeout_s: float = 60.0) -> JoinAnswer:
    """Spend the join token over TLS checked against the pinned CA."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    try:
        resp = httpx.post(f"{manager_url}/v1/join", json=dump(req), verify=ctx, timeout=timeout_s)
    except httpx.TransportError as exc:
        raise Unreachable(manager_url, str(exc) or type(exc).__name__) from exc
    return JoinAnswer.model_validate_json(_check(resp).content)
