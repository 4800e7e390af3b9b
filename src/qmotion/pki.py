"""The cluster's certificate authority: it signs each host's certificate at registration.

Migration streams (QEMU ``tls-creds-x509``) and the agents' calls to each other at switchover
are mutual TLS under this CA: a host proves it belongs to the cluster by its certificate, so no
agent needs another's bearer token. Host keys never leave their host: the agent makes a key
and a signing request, the manager signs it (with the host's name and addresses), and sends
back the certificate with the CA's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qmotion.errors import QmotionError

CA_YEARS = 10
HOST_DAYS = 825  # what public CAs allowed for long; a host re-registers to renew
BACKDATE = dt.timedelta(minutes=5)  # hosts whose clocks lag a little still accept it


class PkiError(QmotionError):
    """A signing request that cannot be signed (bad PEM, bad signature, wrong name)."""


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a host signs handshakes and (QEMU checks it, see
    crypto/tlscredsx509.c) may encipher keys."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ClusterCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path, name: str = "qmotion cluster CA") -> ClusterCA:
        """The CA kept in ``directory`` (made on first use, key readable by root only)."""
        key_file, cert_file = directory / "ca-key.pem", directory / "ca-cert.pem"
        if key_file.exists() and cert_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_file} is not an EC key")
            return cls(key, x509.load_pem_x509_certificate(cert_file.read_bytes()))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(ca=True),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        # Written key first, private from its creation: a crash leaves no readable key.
        write_private(
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        cert_file.chmod(0o644)  # public: clients and joining hosts are given it
        return cls(key, cert)

    def sign_host(self, csr_pem: str, host: str, addresses: list[str]) -> str:
        """The host's certificate for both ends of TLS (server and client): its name and
        every address it is reached at, as QEMU and httpx check them."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise PkiError(f"the signing request of {host} is not a PEM CSR: {exc}") from exc
        if not csr.is_signature_valid:
            raise PkiError(f"the signing request of {host} has a bad signature")
        names = [str(n.value) for n in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [host]:
            raise PkiError(
                f"the signing request is for {names[0] if names else '?'}, not for host {host}"
            )
        alt: list[x509.GeneralName] = [x509.DNSName(host)]
        for a in dict.fromkeys(addresses):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(a)))
            except ValueError:
                alt.append(x509.DNSName(a))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=HOST_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


SERVING_RENEW = dt.timedelta(days=30)


MANAGER_CLIENT = "qmotion-manager"


def serving_certificate(
    ca: ClusterCA, directory: Path, name: str, addresses: list[str], stem: str = "manager"
) -> Path:
    """A certificate of the manager's under ``ca``, for ``name`` and ``addresses`` (made, or
    made again when it lacks one of them or ends within 30 days): its HTTPS certificate, or
    (``stem`` ``manager-client``) the client certificate it calls agents with. Returns the
    directory holding ``STEM-cert.pem`` and ``STEM-key.pem`` (0600)."""
    cert_file, key_file = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
    if cert_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
            have |= set(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            have = set()
        fresh = cert.not_valid_after_utc - _now() > SERVING_RENEW
        if fresh and set(addresses) <= have and name in have:
            return directory
    key_pem = new_key_pem()
    write_private(key_file, key_pem)
    cert_file.write_text(ca.sign_host(csr_for(key_pem, name), name, addresses))
    return directory


def write_private(path: Path, data: bytes) -> None:
    """A file private from its creation (0600): a crash never leaves a readable key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_key_pem() -> bytes:
    """A new host key, PEM (PKCS#8, unencrypted: QEMU reads it unattended)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def csr_for(key_pem: bytes, host: str) -> str:
    """The signing request an agent sends for its key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the host key is not an EC key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class ManagerTls:
    """What the manager calls agents with: the cluster CA (agents' certificates are checked
    against it) and its client certificate under the clients CA (the one thing an agent's
    control API accepts)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    clients_ca_pem: str

    @classmethod
    def load_or_create(cls, ca_dir: Path) -> ManagerTls:
        """The clients CA lives beside the cluster CA (``clients/``): a host's certificate,
        signed by the cluster CA, is never taken for the manager's."""
        clients = ClusterCA.load_or_create(ca_dir / "clients", "qmotion manager clients CA")
        served = serving_certificate(clients, ca_dir, MANAGER_CLIENT, [], stem="manager-client")
        return cls(
            ca_file=ca_dir / "ca-cert.pem",
            cert_file=served / "manager-client-cert.pem",
            key_file=served / "manager-client-key.pem",
            clients_ca_pem=clients.cert_pem,
        )
