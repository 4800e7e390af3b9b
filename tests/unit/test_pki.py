"""The cluster CA and the hosts' certificates: real TLS handshakes between two stores."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from qmotion.agent.errors import Conflict, SpecRejected
from qmotion.agent.tls import TlsStore
from qmotion.pki import ClusterCA, PkiError


def _host(tmp: Path, ca: ClusterCA, name: str) -> TlsStore:
    store = TlsStore(tmp / name, name)
    cert = ca.sign_host(store.csr(), name, ["198.18.9.11", "198.19.9.11"])
    store.install(ca.cert_pem, cert)
    return store


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> str:
    a, b = socket.socketpair()
    got: dict[str, object] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                got["peer"] = s.getpeercert()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            got["error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=hostname) as c:
            reply = c.recv(2)
    finally:
        t.join(5)
    if "error" in got:
        raise got["error"]  # type: ignore[misc]
    return reply.decode()


def test_hosts_of_one_cluster_authenticate_each_other(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path / "ca")
    h1, h2 = _host(tmp_path, ca, "h1"), _host(tmp_path, ca, "h2")
    assert h1.ready and h2.ready
    # By name and by any of its addresses, as QEMU (tls-hostname) and httpx check them.
    assert _handshake(h2.server_context(), h1.client_context(), "h2") == "ok"
    assert _handshake(h2.server_context(), h1.client_context(), "198.18.9.11") == "ok"
    # The CA persists: a restarted manager signs with the same one.
    again = ClusterCA.load_or_create(tmp_path / "ca")
    assert again.cert_pem == ca.cert_pem
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_a_host_of_another_cluster_is_refused(tmp_path: Path) -> None:
    ours = ClusterCA.load_or_create(tmp_path / "ca")
    theirs = ClusterCA.load_or_create(tmp_path / "other")
    h2 = _host(tmp_path, ours, "h2")
    stranger = _host(tmp_path / "x", theirs, "h1")
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(h2.server_context(), stranger.client_context(), "h2")


def test_signing_refuses_a_request_for_another_name(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path / "ca")
    store = TlsStore(tmp_path / "h1", "h1")
    with pytest.raises(PkiError, match="not for host h9"):
        ca.sign_host(store.csr(), "h9", [])
    with pytest.raises(PkiError, match="not a PEM CSR"):
        ca.sign_host("garbage", "h1", [])


def test_an_agent_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path / "ca")
    a, b = TlsStore(tmp_path / "a", "h1"), TlsStore(tmp_path / "b", "h1")
    cert_for_a = ca.sign_host(a.csr(), "h1", [])
    b.csr()
    with pytest.raises(SpecRejected, match="not for this host's key"):
        b.install(ca.cert_pem, cert_for_a)
    assert not b.ready


def test_an_agent_keeps_the_ca_it_joined_under(tmp_path: Path) -> None:
    """A token is not enough to make a host trust another CA; its own CA may renew it."""
    ours = ClusterCA.load_or_create(tmp_path / "ca")
    theirs = ClusterCA.load_or_create(tmp_path / "other-ca")
    store = _host(tmp_path, ours, "h1")
    with pytest.raises(Conflict, match="already trusts another cluster CA"):
        store.install(theirs.cert_pem, theirs.sign_host(store.csr(), "h1", []))
    assert (store.qemu_dir / "ca-cert.pem").read_text() == ours.cert_pem
    renewed = ours.sign_host(store.csr(), "h1", ["198.18.9.11"])
    store.install(ours.cert_pem, renewed)
    assert (store.qemu_dir / "server-cert.pem").read_text() == renewed
