"""Enrolment through the real manager app: one-time join tokens, the join's signing, host
removal; and the joining side's CA pinning."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from sqlalchemy import update

from qmotion.agent.tls import TlsStore
from qmotion.client.enrol import fingerprint
from qmotion.pki import ClusterCA
from qmotion.server.db import Database, JoinToken, utcnow
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

ROOT = {"Authorization": "Bearer service-token-0123456789abcdef"}


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[TestClient, Database, ClusterCA]]:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World()
    world.register_hosts(db)
    world.add_running_vm(db, "web", "h1")
    ca = ClusterCA.load_or_create(tmp_path / "ca")
    app = create_app(url, ROOT["Authorization"][7:], agents=world.connector(), ca=ca)
    with TestClient(app) as client:
        yield client, db, ca


def _add(client: TestClient, name: str = "h9") -> dict[str, str]:
    resp = client.post(
        "/v1/hosts/join-tokens", json={"name": name, "address": "198.18.0.19"}, headers=ROOT
    )
    assert resp.status_code == 201, resp.text
    out: dict[str, str] = resp.json()
    return out


def _csr(tmp_path: Path, name: str) -> str:
    return TlsStore(tmp_path / f"state-{name}", name).csr()


def test_a_host_joins_once_with_its_token_and_gets_a_certificate_for_its_key(
    manager: tuple[TestClient, Database, ClusterCA], tmp_path: Path
) -> None:
    client, _, ca = manager
    added = _add(client)
    assert added["ca_hash"] == fingerprint(ca.cert_pem)
    assert f"--name h9 --token {added['token']} --ca-hash {added['ca_hash']}" in added["command"]
    store = TlsStore(tmp_path / "h9", "h9")
    resp = client.post("/v1/join", json={"token": added["token"], "csr_pem": store.csr()})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    store.install(answer["ca_pem"], answer["cert_pem"])  # refuses a cert for another key
    cert = x509.load_pem_x509_certificate(answer["cert_pem"].encode())
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.18.0.19") in san.get_values_for_type(x509.IPAddress)
    hosts = {h["name"]: h for h in client.get("/v1/hosts", headers=ROOT).json()}
    assert hosts["h9"]["state"] == "down"  # until its agent first answers
    assert hosts["h9"]["agent_url"] == "http://198.18.0.19:8100"
    again = client.post("/v1/join", json={"token": added["token"], "csr_pem": store.csr()})
    assert again.status_code == 422 and "used" in again.json()["error"]["message"]


def test_a_request_for_another_name_is_refused_and_leaves_the_token_good(
    manager: tuple[TestClient, Database, ClusterCA], tmp_path: Path
) -> None:
    client, _, _ = manager
    token = _add(client)["token"]
    wrong = client.post("/v1/join", json={"token": token, "csr_pem": _csr(tmp_path, "h1")})
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "csr_pem"
    assert "h9" not in [h["name"] for h in client.get("/v1/hosts", headers=ROOT).json()]
    right = client.post("/v1/join", json={"token": token, "csr_pem": _csr(tmp_path, "h9")})
    assert right.status_code == 200, right.text


def test_unknown_and_expired_tokens_are_refused(
    manager: tuple[TestClient, Database, ClusterCA], tmp_path: Path
) -> None:
    client, db, _ = manager
    csr = _csr(tmp_path, "h9")
    unknown = client.post("/v1/join", json={"token": "qmj_" + "x" * 40, "csr_pem": csr})
    assert unknown.status_code == 422 and "unknown" in unknown.json()["error"]["message"]
    token = _add(client)["token"]
    with db.session() as s:
        s.execute(update(JoinToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    expired = client.post("/v1/join", json={"token": token, "csr_pem": csr})
    assert expired.status_code == 422 and "expired" in expired.json()["error"]["message"]
    assert len(client.get("/v1/hosts", headers=ROOT).json()) == 2


def test_a_name_in_use_is_refused_and_a_host_with_vms_is_not_removed(
    manager: tuple[TestClient, Database, ClusterCA],
) -> None:
    client, _, _ = manager
    resp = client.post(
        "/v1/hosts/join-tokens", json={"name": "h1", "address": "198.18.0.11"}, headers=ROOT
    )
    assert resp.status_code == 409 and resp.json()["error"]["field"] == "name"
    busy = client.delete("/v1/hosts/h1", headers=ROOT)
    assert busy.status_code == 409 and "web" in busy.json()["error"]["message"]
    assert client.delete("/v1/hosts/h2", headers=ROOT).status_code == 204
    assert [h["name"] for h in client.get("/v1/hosts", headers=ROOT).json()] == ["h1"]
    assert client.delete("/v1/hosts/h2", headers=ROOT).status_code == 404


def test_an_insecure_manager_has_no_join(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with TestClient(create_app(url, ROOT["Authorization"][7:])) as client:
        resp = client.post(
            "/v1/hosts/join-tokens", json={"name": "h9", "address": "198.18.0.19"}, headers=ROOT
        )
        assert resp.status_code == 409 and "insecure" in resp.json()["error"]["message"]


def test_of_two_joins_with_one_token_at_once_exactly_one_gets_in(
    manager: tuple[TestClient, Database, ClusterCA], tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client, _, _ = manager
    token = _add(client)["token"]
    csrs = [_csr(tmp_path / str(i), "h9") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda csr: client.post("/v1/join", json={"token": token, "csr_pem": csr}),
                csrs,
            )
        )
    assert sorted(r.status_code for r in codes) == [200, 422, 422, 422], [r.text for r in codes]
    assert [h["name"] for h in client.get("/v1/hosts", headers=ROOT).json()].count("h9") == 1


def _facts(address: str, *migration: str) -> dict[str, object]:
    from tests.unit.test_openapi_fuzz import _host_facts

    facts = _host_facts("x").model_dump(mode="json")
    facts["address"] = address
    facts["migration_networks"] = [
        {"address": a, "ifname": "eth1", "prefixlen": 24} for a in migration
    ]
    return facts


def test_a_certificate_names_only_approved_addresses_of_that_host(tmp_path: Path) -> None:
    """A host's agent reports its addresses; its certificate never names one the admin did
    not approve at the join, a DNS name, another host's or the manager's."""
    from qmotion.api.host import HostFacts
    from qmotion.server.db import Host
    from qmotion.server.inventory import Inventory

    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.session() as s:
        s.add(Host(name="h1", agent_url="https://198.18.0.11:8100", token="",
                   approved=["198.18.0.11", "198.19.0.11"]))  # fmt: skip
        s.add(Host(name="h2", agent_url="http://198.18.0.12:8100", token="t" * 32,
                   facts=_facts("198.18.0.12", "198.19.0.12")))  # fmt: skip
        s.add(Host(name="h3", agent_url="http://198.18.0.13:8100", token="t" * 32))
    inv = Inventory(db, ca=ClusterCA.load_or_create(tmp_path / "ca"),
                    manager_addresses=("198.18.0.1",))  # fmt: skip
    claims = _facts("198.18.0.11", "198.19.0.11", "198.19.0.99", "198.19.0.12", "198.18.0.1")
    nets = claims["migration_networks"]
    assert isinstance(nets, list)
    nets.append({"address": "manager.example", "ifname": "eth2", "prefixlen": 24})
    assert inv.certifiable("h1", HostFacts.model_validate(claims)) == [
        "198.18.0.11",
        "198.19.0.11",
    ]
    # A host registered by hand (no approved list) still never gets another's or the manager's.
    h3 = _facts("198.18.0.13", "198.19.0.13", "198.18.0.12", "198.18.0.1")
    assert inv.certifiable("h3", HostFacts.model_validate(h3)) == ["198.18.0.13", "198.19.0.13"]
