"""A cold migration's disk exports are TLS and read only by the destination named for the
transfer: real qemu-nbd and qemu-img, two in-process agents with certificates of one CA."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.tls import TlsStore
from qmotion.pki import ClusterCA

TOKEN = "t" * 32
DATA = b"qmotion cold export " * 4096


def _store(state: Path, ca: ClusterCA, name: str) -> TlsStore:
    store = TlsStore(state, name)
    store.install(ca.cert_pem, ca.sign_host(store.csr(), name, ["127.0.0.1"]))
    return store


def _agent(tmp: Path, name: str, ca: ClusterCA) -> TestClient:
    store = tmp / f"{name}-ds"
    store.mkdir()
    config = AgentConfig(
        name=name,
        state_dir=tmp / f"{name}-state",
        token=TOKEN,
        address="127.0.0.1",
        run_dir=tmp / f"{name}-run",
        accel="tcg",
        datastores=(DatastoreConfig("ds", store, False),),
    )
    config.state_dir.mkdir()
    _store(config.state_dir, ca, name)
    client = TestClient(create_app(config))
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    return client


@pytest.fixture
def exported(tmp_path: Path) -> Iterator[tuple[dict[str, object], TestClient, ClusterCA]]:
    ca = ClusterCA.load_or_create(tmp_path / "ca")
    with _agent(tmp_path, "h1", ca) as h1, _agent(tmp_path, "h2", ca) as h2:
        disk = tmp_path / "h1-ds" / "vm1.raw"
        disk.write_bytes(DATA)
        spec: dict[str, object] = {"name": "vm1", "memory": "64M", "boot": {"kind": "disk"}}
        spec["disks"] = [{"datastore": "ds", "path": "vm1.raw", "format": "raw"}]
        assert h1.post("/v1/vms", json=spec).status_code == 201
        resp = h1.post("/v1/vms/vm1/export", params={"reader": "h2"})
        assert resp.status_code == 200, resp.text
        (export,) = resp.json()
        try:
            yield export, h2, ca
        finally:
            assert h1.delete("/v1/vms/vm1/export").status_code == 204


def _read(
    export: dict[str, object], creds: Path | None, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """qemu-img reading the export, with a client certificate directory or without TLS."""
    out = tmp / "read.raw"
    out.unlink(missing_ok=True)
    uri = str(export["uri"])
    if creds is None:
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)]
    else:
        hostport, _, name = uri.removeprefix("nbd://").partition("/")
        host, _, port = hostport.rpartition(":")
        argv = [
            "qemu-img", "convert",
            "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts",
            f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},"
            f"file.server.port={port},file.export={name},file.tls-creds=tls0",
            "-O", "raw", str(out),
        ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_the_named_destination_copies_the_export_byte_for_byte(
    exported: tuple[dict[str, object], TestClient, ClusterCA], tmp_path: Path
) -> None:
    export, h2, _ = exported
    assert export["tls"] is True
    req = {"uri": export["uri"], "datastore": "ds", "path": "vm1.raw", "format": "raw"}
    resp = h2.post("/v1/disk-copies", json={**req, "tls": True})
    assert resp.status_code == 200, resp.text
    assert (tmp_path / "h2-ds" / "vm1.raw").read_bytes() == DATA


def test_no_other_reader_gets_a_byte(
    exported: tuple[dict[str, object], TestClient, ClusterCA], tmp_path: Path
) -> None:
    export, _, ca = exported
    plain = _read(export, None, tmp_path)
    assert plain.returncode != 0
    # Another host of the same cluster: its certificate is good, but not the one named.
    other = _store(tmp_path / "h3-state", ca, "h3")
    refused = _read(export, other.qemu_dir, tmp_path)
    assert refused.returncode != 0, refused.stderr
    # A host of another cluster.
    stranger = _store(tmp_path / "x-state", ClusterCA.load_or_create(tmp_path / "x-ca"), "h2")
    assert _read(export, stranger.qemu_dir, tmp_path).returncode != 0
    assert not (tmp_path / "read.raw").exists() or (tmp_path / "read.raw").read_bytes() != DATA
    # ... while the named one reads it (the refusals above were not a broken export).
    named = _read(export, Path(tmp_path / "h2-state" / "tls" / "qemu"), tmp_path)
    assert named.returncode == 0, named.stderr
    assert (tmp_path / "read.raw").read_bytes() == DATA
