"""QEMU's TLS server credentials come with a standard Diffie-Hellman group on disk: without
dh-params.pem QEMU generates a 2048-bit group at every incoming migration (0.6 s of a core,
issue 27)."""

from __future__ import annotations

import base64
from pathlib import Path

from qmotion.agent.tls import DH_PARAMS, TlsStore


def test_a_host_that_joined_before_gets_the_group_at_start(tmp_path: Path) -> None:
    store = TlsStore(tmp_path, "h1")
    store.qemu_dir.mkdir(parents=True)
    store.open_to_qemu()
    pem = (store.qemu_dir / DH_PARAMS).read_text().splitlines()
    assert pem[0] == "-----BEGIN DH PARAMETERS-----" and pem[-1] == "-----END DH PARAMETERS-----"
    # PKCS#3 DER: SEQUENCE { INTEGER p (2048 bits, a leading 0 byte), INTEGER g }.
    der = base64.b64decode("".join(pem[1:-1]))
    assert der[:9] == bytes.fromhex("308201080282010100")
    p, g = int.from_bytes(der[9:265], "big"), der[265:]
    assert g == bytes.fromhex("020102") and p.bit_length() == 2048
    # RFC 7919's groups begin and end with 64 one-bits.
    assert p >> (2048 - 64) == (1 << 64) - 1 and p & ((1 << 64) - 1) == (1 << 64) - 1


def test_a_host_not_joined_has_no_credential_directory_made_for_it(tmp_path: Path) -> None:
    store = TlsStore(tmp_path, "h1")
    store.open_to_qemu()
    assert not store.qemu_dir.exists()
