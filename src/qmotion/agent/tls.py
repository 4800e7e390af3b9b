"""The agent's certificate under the cluster CA, and the mutual-TLS port other agents call.

The key is made here and never leaves the host; the manager signs a request for it at
registration. The files are laid out as QEMU's ``tls-creds-x509`` reads a directory (one
certificate serves as server and client), and the peer port serves the one call an agent makes
to another at switchover, for any caller whose certificate the cluster CA signed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from fastapi import FastAPI

from qmotion import logs
from qmotion.agent.errors import Conflict, OperationFailed, SpecRejected
from qmotion.hypervisor.errors import HypervisorError
from qmotion.hypervisor.user import QemuUser
from qmotion.pki import csr_for, new_key_pem, write_private

log = logging.getLogger(__name__)
QEMU_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)
# The finite-field Diffie-Hellman group a TLS server offers (RFC 7919 ffdhe2048, public and
# standard). Without this file QEMU generates a fresh 2048-bit group each time it loads its
# server credentials, that is at every incoming migration: 0.6 s of one core here.
DH_PARAMS = "dh-params.pem"
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class TlsStore:
    """``state_dir/tls``: the host key, and once signed, QEMU's credential directory.

    With ``reader`` (the user QEMU runs as), QEMU's credentials are readable by its group,
    as libvirt keeps ``/etc/pki/qemu``: QEMU loads them itself for a migration's TLS. The
    host key they copy stays root's only.
    """

    def __init__(self, state_dir: Path, host: str, reader: QemuUser | None = None) -> None:
        self.dir = state_dir / "tls"
        self.qemu_dir = self.dir / "qemu"
        self.host = host
        self.key_file = self.dir / "host-key.pem"
        self.reader = reader

    def open_to_qemu(self) -> None:
        """QEMU's credentials readable by its user (at start-up: ``agent join`` wrote them
        before the agent knew that user)."""
        if not self.qemu_dir.is_dir():
            return
        self._write_dh_params()
        if self.reader is None:
            return
        try:
            self.reader.reach(self.qemu_dir / QEMU_FILES[0], [self.dir.parent])
            for name in (*QEMU_FILES, DH_PARAMS):
                if (self.qemu_dir / name).exists():
                    self.reader.share(self.qemu_dir / name)
        except (OSError, HypervisorError) as exc:
            raise OperationFailed(
                f"QEMU's credentials cannot be given to {self.reader.name}: {exc}",
                field="qemu_user",
            ) from exc

    def _write_dh_params(self) -> None:
        """The DH group QEMU's server credentials load, readable by QEMU before it is in
        place. A failure leaves none: QEMU then makes its own (slow, but it works), where an
        unreadable file would fail every incoming TLS migration."""
        dh = self.qemu_dir / DH_PARAMS
        if dh.exists():
            return
        tmp = self.qemu_dir / f".{DH_PARAMS}.new"
        try:
            tmp.write_text(FFDHE2048_PEM)
            tmp.chmod(0o644)  # public: a standard group
            if self.reader is not None:
                self.reader.share(tmp)
            tmp.replace(dh)
        except (OSError, HypervisorError) as exc:
            log.warning("no %s for QEMU (it makes its own at each migration): %s", dh, exc)
            tmp.unlink(missing_ok=True)

    @property
    def ready(self) -> bool:
        return all((self.qemu_dir / f).exists() for f in QEMU_FILES)

    def not_after(self) -> dt.datetime | None:
        """When this host's certificate ends (None: it has none yet)."""
        try:
            pem = (self.qemu_dir / "server-cert.pem").read_bytes()
        except FileNotFoundError:
            return None
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc

    @property
    def manager_ca_file(self) -> Path:
        return self.dir / "manager-ca.pem"

    @property
    def control_tls(self) -> bool:
        """The control API is mutual TLS: this host joined, and knows whose client
        certificates to accept (the manager's)."""
        return self.ready and self.manager_ca_file.exists()

    def install_manager_ca(self, pem: str) -> None:
        try:
            x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise SpecRejected(f"not a PEM certificate: {exc}", field="manager_ca_pem") from exc
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.dir / ".manager-ca.pem.new"
        tmp.write_text(pem)
        tmp.replace(self.manager_ca_file)

    def reload_control(self, ctx: ssl.SSLContext) -> None:
        ctx.load_cert_chain(self.qemu_dir / "server-cert.pem", self.qemu_dir / "server-key.pem")

    def control_server_options(self) -> dict[str, object]:
        """uvicorn's TLS settings for the control API: this host's certificate, and only
        clients with a certificate of the manager's clients CA (never a host's)."""
        return {
            "ssl_certfile": str(self.qemu_dir / "server-cert.pem"),
            "ssl_keyfile": str(self.qemu_dir / "server-key.pem"),
            "ssl_ca_certs": str(self.manager_ca_file),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
        }

    def csr(self) -> str:
        """A signing request for this host's key (made on first use, kept across requests:
        a request answered late still matches the key)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.key_file.exists():
            write_private(self.key_file, new_key_pem())
        return csr_for(self.key_file.read_bytes(), self.host)

    def install(self, ca_pem: str, cert_pem: str) -> None:
        """Keep the signed certificate, refusing one that is not for this host's key."""
        if not self.key_file.exists():
            raise Conflict("no key here: ask for a signing request first")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            ca = x509.load_pem_x509_certificate(ca_pem.encode())
        except ValueError as exc:
            raise SpecRejected(f"not a PEM certificate: {exc}", field="cert_pem") from exc
        key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.PEM, spki) != (
            key.public_key().public_bytes(serialization.Encoding.PEM, spki)
        ):
            raise SpecRejected("the certificate is not for this host's key", field="cert_pem")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError) as exc:
            raise SpecRejected(f"the certificate is not signed by that CA: {exc}") from exc
        trusted = self.qemu_dir / "ca-cert.pem"
        if trusted.exists():
            # The CA this host joined under stays: a token alone must not let anyone make
            # the host trust another CA (its peers' certificates, its migration streams).
            current = x509.load_pem_x509_certificate(trusted.read_bytes())
            if current.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
                raise Conflict(
                    "this host already trusts another cluster CA; to change it, remove "
                    f"{self.dir} and join again (`qmotion agent join`)"
                )
        self.qemu_dir.mkdir(parents=True, exist_ok=True)
        key_pem = self.key_file.read_bytes()
        # Written to new names, then renamed: QEMU may be reading the directory.
        for name, data, private in (
            ("ca-cert.pem", ca_pem.encode(), False),
            ("server-cert.pem", cert_pem.encode(), False),
            ("client-cert.pem", cert_pem.encode(), False),
            ("server-key.pem", key_pem, True),
            ("client-key.pem", key_pem, True),
        ):
            tmp = self.qemu_dir / f".{name}.new"
            if private:
                write_private(tmp, data)
            else:
                tmp.write_bytes(data)
            if self.reader is not None:
                self.reader.share(tmp)
            tmp.replace(self.qemu_dir / name)
        self.open_to_qemu()

    def server_context(self) -> ssl.SSLContext:
        """Peers must show a certificate the cluster CA signed."""
        ctx = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=self.qemu_dir / "ca-cert.pem"
        )
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.qemu_dir / "server-cert.pem", self.qemu_dir / "server-key.pem")
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.qemu_dir / "ca-cert.pem")
        ctx.load_cert_chain(self.qemu_dir / "client-cert.pem", self.qemu_dir / "client-key.pem")
        return ctx


def listening_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound for uvicorn's ``sockets=``, whose connections send at once.

    asyncio turns Nagle off only on sockets whose ``proto`` says TCP, and a socket made with
    proto 0 (the default) accepts connections that keep Nagle on: a response written in two
    pieces (uvicorn writes headers, then the body) then waits for the client's delayed ACK,
    ~40 ms on every call (measured: 44 ms per /healthz on the peer port, 1.3 ms without).
    Linux hands TCP_NODELAY on from the listening socket to the accepted ones."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


class _QuietServer(uvicorn.Server):
    """A second server in the agent's loop: the main one owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class PeerListener:
    """Serves ``app`` with mutual TLS on ``port`` of each of ``addresses`` while the agent
    runs."""

    def __init__(self, app: FastAPI, addresses: list[str], port: int) -> None:
        self.app, self.addresses, self.port = app, addresses, port
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # two certificate installs at once: one restart at a time

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, store: TlsStore) -> None:
        async with self._lock:
            await self._stop()  # a new certificate: serve with it
            await self._start(store)

    async def _start(self, store: TlsStore) -> None:
        socks: list[socket.socket] = []
        try:
            for address in self.addresses:
                socks.append(listening_socket(address, self.port))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        # The service's logging options: uvicorn's own configuration (or access_log=False)
        # would rewire its loggers for the whole process, the main API's access log too.
        config = uvicorn.Config(
            self.app,
            **logs.uvicorn_options(True),
            ssl_certfile=str(store.qemu_dir / "server-cert.pem"),
            ssl_keyfile=str(store.qemu_dir / "server-key.pem"),
            ssl_ca_certs=str(store.qemu_dir / "ca-cert.pem"),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=socks), name="peer-tls")
        for _ in range(100):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.02)
        if self._task.done():
            self._task.result()  # its error, raised here
        if self._server.started:
            log.info("peer TLS port %s:%d serving", ",".join(self.addresses), self.port)
        else:
            log.warning("peer TLS port %s:%d not serving yet", ",".join(self.addresses), self.port)

    async def stop(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        self._server = self._task = None
