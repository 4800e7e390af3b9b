"""Enrolment on the lab: `qmotion agent join` from another machine pins the cluster CA by its
hash and spends its token once; the manager answers only HTTPS under that CA."""

from __future__ import annotations

import grp
import socket
import ssl
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from qmotion.agent.tls import TlsStore
from qmotion.api.enrol import JoinTokenCreate
from qmotion.client.server import ServerClient
from qmotion.lab import Lab
from qmotion.pki import ClusterCA


def _join(lab: Lab, args: list[str]) -> subprocess.CompletedProcess[str]:
    rec = lab.record
    assert rec.manager_url is not None
    argv = ["ip", "netns", "exec", rec.client_namespace, sys.executable, "-m", "qmotion"]
    argv += ["agent", "join", rec.manager_url, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_join_pins_the_ca_and_spends_its_token_once(
    lab: Lab, server: ServerClient, tmp_path: Path
) -> None:
    net = lab.record.switch_address.rsplit(".", 1)[0]
    jt = server.create_join_token(
        JoinTokenCreate.model_validate({"name": "h9", "address": f"{net}.19"})
    )
    state, config = tmp_path / "state", tmp_path / "agent.toml"
    args = ["--name", "h9", "--token", jt.token, "--config", str(config)]
    args += ["--state-dir", str(state)]
    try:
        # Someone in between (or a wrong address) shows another CA: nothing is sent.
        wrong = _join(lab, [*args, "--ca-hash", "sha256:" + "0" * 64])
        assert wrong.returncode != 0 and "refusing to join" in wrong.stderr, wrong.stderr
        assert "h9" not in [h.name for h in server.hosts()]
        assert not (state / "agent.token").exists()

        ok = _join(lab, [*args, "--ca-hash", jt.ca_hash])
        assert ok.returncode == 0, ok.stderr
        written = tomllib.loads(config.read_text())
        assert written["name"] == "h9" and written["listen"] == f"{net}.19:8100"
        key = state / "tls" / "host-key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o711  # QEMU's user passes through
        # The manager calls it by its client certificate: no token exists anywhere.
        assert (state / "tls" / "manager-ca.pem").is_file()
        assert not (state / "agent.token").exists() and "token" not in written
        joined = {h.name: h for h in server.hosts()}["h9"]
        assert joined.state == "down"  # no agent runs there yet
        assert joined.agent_url == f"https://{net}.19:8100"

        again = _join(lab, [*args, "--ca-hash", jt.ca_hash])
        assert again.returncode != 0 and "used" in again.stderr, again.stderr
    finally:
        if "h9" in [h.name for h in server.hosts()]:
            server.remove_host("h9")
    assert "h9" not in [h.name for h in server.hosts()]


def test_the_manager_speaks_only_https_under_the_cluster_ca(lab: Lab) -> None:
    rec = lab.record
    assert rec.manager_url is not None and rec.manager_url.startswith("https://")
    assert rec.manager_ca_file is not None
    plain = rec.manager_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/healthz", timeout=5)
    # Not trusted without the cluster CA ...
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{rec.manager_url}/healthz", timeout=5)
    # ... and checked, name included, with it.
    ctx = ssl.create_default_context(cafile=rec.manager_ca_file)
    assert httpx.get(f"{rec.manager_url}/healthz", verify=ctx, timeout=5).status_code == 200


def test_an_agent_takes_only_the_managers_certificate(lab: Lab) -> None:
    """A joined host's control API: no client certificate, a host's certificate (the
    cluster CA's) or another CA's are refused in the handshake; the manager's gets in."""
    h1 = lab.host("h1")
    assert h1.agent_url.startswith("https://")
    ca = Path(lab.record.dir) / "ca"
    url = f"{h1.agent_url}/v1/host"

    def get(cert: tuple[str, str] | None) -> int:
        ctx = ssl.create_default_context(cafile=ca / "ca-cert.pem")
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return httpx.get(url, verify=ctx, timeout=10).status_code

    host_tls = Path(lab.host("h2").state_dir) / "tls" / "qemu"
    stranger = ClusterCA.load_or_create(Path(lab.record.dir) / "stranger-ca")
    store = TlsStore(Path(lab.record.dir) / "stranger", "qmotion-manager")
    store.install(stranger.cert_pem, stranger.sign_host(store.csr(), "qmotion-manager", []))
    for cert in (
        None,
        (str(host_tls / "client-cert.pem"), str(host_tls / "client-key.pem")),
        (str(store.qemu_dir / "client-cert.pem"), str(store.qemu_dir / "client-key.pem")),
    ):
        with pytest.raises(httpx.HTTPError):
            get(cert)
    manager = (str(ca / "manager-client-cert.pem"), str(ca / "manager-client-key.pem"))
    assert get(manager) == 200


def _served_serial(url: str, lab: Lab) -> int:
    """The serial of the certificate an https endpoint serves now (a new handshake)."""
    ca = Path(lab.record.dir) / "ca"
    ctx = ssl.create_default_context(cafile=ca / "ca-cert.pem")
    ctx.load_cert_chain(ca / "manager-client-cert.pem", ca / "manager-client-key.pem")
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_renews_every_host_and_serves_the_new_certificate_at_once(
    lab: Lab, server: ServerClient
) -> None:
    h1 = lab.host("h1")
    before = {h.name: h.facts.cert_not_after for h in server.hosts() if h.facts}
    serial = _served_serial(h1.agent_url, lab)
    done = server.rotate_certs()
    assert [d.error for d in done] == [None] * len(lab.record.hosts), done
    for d in done:
        assert d.not_after is not None and d.not_after >= before[d.host]  # type: ignore[operator]
    # The control API serves the renewed certificate without an agent restart.
    assert _served_serial(h1.agent_url, lab) != serial
    assert {h.name: h.state for h in server.hosts()} == {h.name: "up" for h in lab.record.hosts}


def test_the_services_files_are_private_once_they_run(lab: Lab) -> None:
    """What the manager and the agents wrote while starting: keys and the database 0600 in
    0700 directories (the services run with umask 077); what QEMU's user needs, its group's
    to read or pass through only."""
    lab_dir = Path(lab.record.dir)
    private = [
        lab_dir / "manager.db",
        lab_dir / "ca" / "ca-key.pem",
        lab_dir / "ca" / "manager-key.pem",
        lab_dir / "ca" / "manager-client-key.pem",
        lab_dir / "ca" / "clients" / "ca-key.pem",
    ]
    dirs = [lab_dir / "ca", lab_dir / "ca" / "clients"]
    qemu_gid = grp.getgrnam("qmotion-qemu").gr_gid
    # QEMU's own user reads its TLS credentials (group, read-only) and passes through the
    # state directory to them and to its VMs' directories (group search, never a listing).
    qemu_reads: list[Path] = []
    qemu_passes: list[Path] = []
    for h in lab.record.hosts:
        state = Path(h.state_dir)
        private += [state / "tls" / "host-key.pem"]
        qemu_reads += [state / "tls" / "qemu" / "server-key.pem"]
        qemu_passes += [state / "tls", state / "tls" / "qemu", state / "vms"]
        st = state.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 0, 0), state
    for f in private:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in qemu_reads:
        assert (stat.S_IMODE(f.stat().st_mode), f.stat().st_gid) == (0o640, qemu_gid), f
    for d in qemu_passes:
        assert (stat.S_IMODE(d.stat().st_mode), d.stat().st_gid) == (0o710, qemu_gid), d
