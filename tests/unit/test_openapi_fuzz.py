"""The manager's and an agent's APIs fuzzed from their own OpenAPI, as a new user's tools would.

Schemathesis generates valid and invalid requests for every operation and checks each answer:
no server error, a documented status code and content type, and a body that matches the
documented schema (error bodies included). Everything runs in-process and touches no network:
the manager on a temporary SQLite database with scripted agents behind an
``httpx.MockTransport`` (two answer like agents, one is unreachable, one answers 503); the agent
on a temporary state directory, with QEMU's and the kernel's answers faked, and only the
operations that neither start QEMU nor touch the network. Bounded (derandomized, a few dozen
examples per operation) so that it runs in ``make test``.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qmotion.agent import facts as agent_facts
from qmotion.agent.app import create_app as create_agent
from qmotion.agent.config import AgentConfig
from qmotion.agent.tls import TlsStore
from qmotion.agent.vms import definition as agent_vm_definition
from qmotion.agent.vms import manager as agent_vms
from qmotion.api.host import AccelInfo, HostFacts
from qmotion.api.vm import Nic, VmSpec
from qmotion.hypervisor.qemu import QemuInfo
from qmotion.pki import ClusterCA, ManagerTls, serving_certificate
from qmotion.server.access import digest
from qmotion.server.db import ApiToken, Database, Task, User
from qmotion.server.http.app import create_app as create_manager
from tests.unit.agent_world import FakeVm, World, _error, _json

TOKEN = "fuzz-token-0123456789abcdef"  # the service token: the built-in admin
# A token of each lesser role, made in the manager's database: the fuzzer runs as each.
ROLE_TOKENS = {"viewer": "qmu_fuzz-viewer-0123456789", "operator": "qmu_fuzz-operator-012345"}
ROLE_EXAMPLES = 10
BASE_URL = "http://testserver"
MAX_EXAMPLES = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# The manager's VMs, one per host: h1 and h2 answer, h3 is unreachable, h4 answers 503.
MANAGER_VMS = {"web": "h1", "db01": "h2", "cache": "h3", "queue1": "h4"}
AGENT_VMS = ("web",)
# Valid bodies, mixed into the generated ones: a schema alone rarely yields a VM that a host
# takes (names of hosts, machine types, MACs).
MANAGER_BODIES: dict[str, list[dict[str, Any]]] = {
    "POST /v1/vms": [
        {"name": "new1", "host": "h1", "memory": "256M", "start": True},
        {"name": "new2", "host": "h2", "memory": 512, "address": "198.18.0.150/24"},
        {"name": "new3", "host": "h3", "memory": "256M"},
        {"name": "new4", "host": "h4", "memory": "256M"},
    ],
    "POST /v1/vms/{name}/migrate": [{"to": "h2"}, {"to": "h1", "max_downtime_ms": 300}],
    "POST /v1/hosts": [
        {"name": "h1", "agent_url": "http://agent-h1.test:7100", "token": "t" * 32},
        {"name": "h5", "agent_url": "http://agent-h5.test:7100", "token": "t" * 32},
    ],
}
AGENT_BODIES: dict[str, list[dict[str, Any]]] = {
    "POST /v1/vms": [
        {"name": "new1", "memory": "256M"},
        {"name": "web", "memory": "256M"},
        {"name": "new2", "memory": 512, "nics": [{"mac": "52:54:00:00:0a:01"}], "vcpus": 2},
    ],
}
# The agent's operations that neither start QEMU nor touch the network (nor act on a running
# QEMU): an allowlist, so that an operation added later is not fuzzed before someone looks.
# Left out: starting VMs, migrations (incoming, outgoing, tuning, cancelling), steering,
# release, resume, announce, dirty-rate sampling, network probes.
AGENT_FUZZED = (
    "GET /healthz",
    "GET /v1/host",
    "GET /v1/metrics",
    "GET /metrics",
    "GET /v1/vms",
    "POST /v1/vms",
    "GET /v1/vms/{name}",
    "POST /v1/vms/{name}/stop",
    "DELETE /v1/vms/{name}",
    "GET /v1/vms/{name}/console",
    "GET /v1/vms/{name}/migration",
)
CONFIG: dict[str, Any] = {
    "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
    "phases": {"stateful": {"enabled": False}},
}
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# ------------------------------------------------------------------ the manager and its agents


def _host_facts(name: str) -> HostFacts:
    return HostFacts(
        name=name,
        cpu_model="QEMU Virtual CPU",
        cpu_flags=["sse2"],
        cpus=4,
        memory_bytes=64 << 30,
        qemu_version="10.0.2",
        machine_types=["pc-i440fx-10.0"],
        machine_aliases={"pc": "pc-i440fx-10.0"},
        cpu_models=["qemu64"],
        accel=AccelInfo(name="tcg", reason="fuzz"),
        bridges=["vmbr0"],
        datastores=[],
        agent_version="0",
    )


class Agents(World):
    """The world's agents (tests.unit.agent_world) plus host facts and VM define, start and
    stop; h4, and any URL that is not one of the world's hosts, answers 503."""

    def _answer(self, host: str, req: httpx.Request) -> httpx.Response:
        if host not in self.vms or host == "h4":
            return _error(503, "unavailable", "agent unavailable")
        path, method = req.url.path, req.method
        here = self.vms[host]
        if path == "/v1/host" and method == "GET":
            return _json(_host_facts(host).model_dump(mode="json"))
        if path == "/v1/vms" and method == "POST":
            spec = VmSpec.model_validate(json.loads(req.content))
            if spec.name in here:
                return _error(409, "conflict", f"VM {spec.name} exists", vm=spec.name)
            here[spec.name] = FakeVm(spec=spec, runstate="shutoff")
            return _json(self._info(host, here[spec.name]).model_dump(mode="json"), 201)
        m = re.fullmatch(r"/v1/vms/([a-z0-9-]+)/(start|stop)", path)
        if m and method == "POST" and m.group(1) in here:
            vm = here[m.group(1)]
            vm.runstate = "running" if m.group(2) == "start" else "shutoff"
            return _json(self._info(host, vm).model_dump(mode="json"))
        return super()._answer(host, req)


def _manager(tmp_path: Path) -> FastAPI:
    url = f"sqlite:///{tmp_path / 'manager.db'}"
    db = Database(url)
    world = Agents(hosts=("h1", "h2", "h3", "h4"), polls_to_complete=1)
    world.unreachable.add("h3")
    world.register_hosts(db, facts=lambda h: _host_facts(h).model_dump(mode="json"))
    # Names of distinct lengths: the world derives each VM's MAC from it.
    for name, h in MANAGER_VMS.items():
        world.add_running_vm(db, name, h)
    with db.session() as s:
        s.add(Task(kind="migrate", state="succeeded", vm="web", source="h2", destination="h1"))
    db.set_setting("pool", {"first": "198.18.0.100", "last": "198.18.0.199", "prefixlen": 24})
    with db.session() as s:
        for role, token in ROLE_TOKENS.items():
            user = User(name=f"fuzz-{role}", role=role)
            s.add(user)
            s.flush()
            s.add(ApiToken(user_id=user.id, digest=digest(token), prefix=token[:12]))
    db.engine.dispose()
    return create_manager(url, TOKEN, agents=world.connector())


# ------------------------------------------------------------------ an agent


def _fake_qemu_info(binary: str = "") -> QemuInfo:
    return QemuInfo("10.0.2", ["pc-i440fx-10.0", "q35"], {"pc": "pc-i440fx-10.0"}, ["qemu64"])


def _agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None = TOKEN) -> FastAPI:
    # QEMU's and the kernel's answers, faked: the fuzzed agent runs no binary, reads no links.
    for module in (agent_vms, agent_vm_definition, agent_facts):
        monkeypatch.setattr(module, "qemu_info", _fake_qemu_info)
    for module in (agent_vm_definition, agent_facts):
        monkeypatch.setattr(module, "bridges", lambda: ["vmbr0"])
    # No datastores: no disk image is ever created.
    config = AgentConfig(
        name="h9",
        state_dir=tmp_path / "state",
        token=token,
        run_dir=tmp_path / "run",
        accel="tcg",
        hugepages=False,
    )
    for i, name in enumerate(AGENT_VMS):  # defined, not running
        spec = VmSpec(name=name, memory="256M", nics=[Nic(mac=f"52:54:00:00:09:{i:02x}")])
        vm_dir = config.state_dir / "vms" / name
        vm_dir.mkdir(parents=True)
        (vm_dir / "spec.json").write_text(spec.model_dump_json())
    return create_agent(config)


# ------------------------------------------------------------------ the fuzzing


def _schema(
    app: FastAPI,
    names: tuple[str, ...],
    bodies: dict[str, list[dict[str, Any]]],
    not_server_errors: tuple[int, ...] = (),
    token: str = TOKEN,
) -> schemathesis.BaseSchema:
    """The app's own OpenAPI, as served at /openapi.json (read without starting the app).

    Half the generated VM names are ones the app knows, and half the bodies of the operations
    in ``bodies`` are valid ones, so that more than refusals is exercised.
    ``not_server_errors``: 5xx statuses that are the app's documented answer (the manager's
    502: a host's agent failed), not its own failure."""
    expected = ["2xx", "3xx", "4xx", *map(str, not_server_errors)]
    config = {
        **CONFIG,
        "auth": {"openapi": {"HTTPBearer": {"bearer": token}}},
        "checks": {"not_a_server_error": {"expected-statuses": expected}},
    }
    schema = schemathesis.openapi.from_file(
        json.dumps(app.openapi()), config=schemathesis.Config.from_dict(config)
    )

    @schema.hook("flatmap_path_parameters")
    def _known_names(
        context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
    ) -> st.SearchStrategy[dict[str, Any] | None]:
        if not path_parameters or "name" not in path_parameters:
            return st.just(path_parameters)
        known = st.sampled_from(names).map(lambda n: {**path_parameters, "name": n})
        return st.one_of(st.just(path_parameters), known)

    @schema.hook("flatmap_body")
    def _valid_bodies(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        valid = bodies.get(context.operation.label) if context.operation else None
        return st.one_of(st.just(body), st.sampled_from(valid)) if valid else st.just(body)

    return schema


# Collection needs the operations before any fixture exists: they are read from apps that are
# only constructed (no database file, no state directory); each test calls its own app.
MANAGER = _schema(create_manager("sqlite://", TOKEN), tuple(MANAGER_VMS), MANAGER_BODIES, (502,))
MANAGER_AS = {
    role: _schema(
        create_manager("sqlite://", TOKEN), tuple(MANAGER_VMS), MANAGER_BODIES, (502,), token
    )
    for role, token in ROLE_TOKENS.items()
}
AGENT_CONFIG = AgentConfig(name="h9", state_dir=Path("/nonexistent"), token=TOKEN)
AGENT = _schema(create_agent(AGENT_CONFIG), AGENT_VMS, AGENT_BODIES)
AGENT = AGENT.include(name=list(AGENT_FUZZED))


@pytest.fixture
def manager_app(tmp_path: Path) -> FastAPI:
    return _manager(tmp_path)


@pytest.fixture
def agent_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    return _agent(tmp_path, monkeypatch)


@MANAGER.parametrize()
@FUZZ_SETTINGS
def test_manager_api_fuzzed(case: schemathesis.Case[Any], manager_app: FastAPI) -> None:
    case.call_and_validate(base_url=BASE_URL, app=manager_app, checks=CHECKS)


@MANAGER_AS["viewer"].parametrize()
@settings(FUZZ_SETTINGS, max_examples=ROLE_EXAMPLES)
def test_manager_api_fuzzed_as_a_viewer(case: schemathesis.Case[Any], manager_app: FastAPI) -> None:
    case.call_and_validate(base_url=BASE_URL, app=manager_app, checks=CHECKS)


@MANAGER_AS["operator"].parametrize()
@settings(FUZZ_SETTINGS, max_examples=ROLE_EXAMPLES)
def test_manager_api_fuzzed_as_an_operator(
    case: schemathesis.Case[Any], manager_app: FastAPI
) -> None:
    case.call_and_validate(base_url=BASE_URL, app=manager_app, checks=CHECKS)


# ------------------------------------------------------------------ over HTTPS

HTTPS_EXAMPLES = 5
HTTPS_ROLE_EXAMPLES = 3  # operator and admin: the same routes as the viewer, fewer examples
# The service token is the built-in admin: a schema per role, each over the same server.
MANAGER_HTTPS = {
    role: _schema(
        create_manager("sqlite://", TOKEN), tuple(MANAGER_VMS), MANAGER_BODIES, (502,), token
    )
    for role, token in {**ROLE_TOKENS, "admin": TOKEN}.items()
}


def _serve(app: FastAPI, **tls: Any) -> Iterator[int]:
    """``app`` under a real uvicorn with ``tls``, in a thread, for the duration; its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, log_level="warning", **tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def https_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The manager served as in production: uvicorn, HTTPS under a cluster CA (one server
    for every operation of the run; its state carries over, as a live manager's does)."""
    tmp = tmp_path_factory.mktemp("https")
    app = _manager(tmp)
    ca = ClusterCA.load_or_create(tmp / "ca")
    served = serving_certificate(ca, tmp / "ca", "localhost", ["127.0.0.1"])
    tls = {
        "ssl_certfile": str(served / "manager-cert.pem"),
        "ssl_keyfile": str(served / "manager-key.pem"),
    }
    for port in _serve(app, **tls):
        yield f"https://127.0.0.1:{port}", str(tmp / "ca" / "ca-cert.pem")


def _over_https(case: schemathesis.Case[Any], url: str, ca_file: str) -> None:
    with requests.Session() as session:
        case.call_and_validate(base_url=url, session=session, checks=CHECKS, verify=ca_file)


@MANAGER_HTTPS["viewer"].parametrize()
@settings(FUZZ_SETTINGS, max_examples=HTTPS_EXAMPLES)
def test_manager_api_fuzzed_over_https_as_a_viewer(
    case: schemathesis.Case[Any], https_manager: tuple[str, str]
) -> None:
    """The same checks through TLS (the certificate checked against the cluster CA): what a
    viewer's scripts see of a real manager."""
    _over_https(case, *https_manager)


@MANAGER_HTTPS["operator"].parametrize()
@settings(FUZZ_SETTINGS, max_examples=HTTPS_ROLE_EXAMPLES)
def test_manager_api_fuzzed_over_https_as_an_operator(
    case: schemathesis.Case[Any], https_manager: tuple[str, str]
) -> None:
    _over_https(case, *https_manager)


@MANAGER_HTTPS["admin"].parametrize()
@settings(FUZZ_SETTINGS, max_examples=HTTPS_ROLE_EXAMPLES)
def test_manager_api_fuzzed_over_https_as_an_admin(
    case: schemathesis.Case[Any], https_manager: tuple[str, str]
) -> None:
    _over_https(case, *https_manager)


@pytest.fixture(scope="module")
def mtls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, str]]:
    """A joined agent as in production: uvicorn, its host certificate, and only the manager's
    client certificate let in (no bearer token exists)."""
    tmp = tmp_path_factory.mktemp("mtls")
    ca = ClusterCA.load_or_create(tmp / "ca")
    manager = ManagerTls.load_or_create(tmp / "ca")
    store = TlsStore(tmp / "state", "h9")
    store.install(ca.cert_pem, ca.sign_host(store.csr(), "h9", ["127.0.0.1"]))
    store.install_manager_ca(manager.clients_ca_pem)
    with pytest.MonkeyPatch.context() as mp:
        app = _agent(tmp, mp, token=None)
        for port in _serve(app, **store.control_server_options()):
            client = (str(manager.cert_file), str(manager.key_file))
            yield f"https://127.0.0.1:{port}", client, str(manager.ca_file)


AGENT_MTLS = _schema(create_agent(AGENT_CONFIG), AGENT_VMS, AGENT_BODIES).include(
    name=list(AGENT_FUZZED)
)


@AGENT_MTLS.parametrize()
@settings(FUZZ_SETTINGS, max_examples=HTTPS_EXAMPLES)
def test_agent_api_fuzzed_over_mutual_tls(
    case: schemathesis.Case[Any], mtls_agent: tuple[str, Any, str]
) -> None:
    """A joined agent's control API as the manager calls it: mutual TLS, the manager's
    client certificate."""
    url, client, ca_file = mtls_agent
    with requests.Session() as session:
        session.cert = client
        case.call_and_validate(base_url=url, session=session, checks=CHECKS, verify=ca_file)


@AGENT.parametrize()
@FUZZ_SETTINGS
def test_agent_api_fuzzed(case: schemathesis.Case[Any], agent_app: FastAPI) -> None:
    case.call_and_validate(base_url=BASE_URL, app=agent_app, checks=CHECKS)


# ------------------------------------------------------------------ what the fuzzer found


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(_manager(tmp_path)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


@pytest.mark.parametrize("path", ["/v1/tasks/{}", "/v1/tasks/{}/cancel"])
def test_task_id_beyond_64_bits_is_refused(client: TestClient, path: str) -> None:
    url = path.format(2**64)
    resp = client.post(url) if url.endswith("/cancel") else client.get(url)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "task_id"


@pytest.mark.parametrize("field", ["first", "last"])
@pytest.mark.parametrize("value", ["", False, "198.18.0"])
def test_pool_with_a_bad_address_names_the_field(
    client: TestClient, field: str, value: object
) -> None:
    pool: dict[str, object] = {"first": "198.18.0.100", "last": "198.18.0.199", "prefixlen": 24}
    pool[field] = value
    resp = client.put("/v1/pool", json=pool)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("field", "value"),
    [("agent_url", "0"), ("agent_url", "http://h1:99999"), ("token", "é" * 16)],
)
def test_host_that_no_http_client_can_reach_is_refused(
    client: TestClient, field: str, value: str
) -> None:
    req = {"name": "h5", "agent_url": "http://agent-h1.test:7100", "token": "t" * 32}
    req[field] = value
    resp = client.post("/v1/hosts", json=req)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field


def test_error_bodies_are_in_the_openapi(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/tasks/{task_id}"]["get"]
    for status in ("401", "404", "422"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), (status, ref)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    resp = client.get("/v1/no-such-route")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_recommendation_id_beyond_64_bits_is_refused(client: TestClient) -> None:
    resp = client.post("/v1/drs/apply", json={"ids": [2**63]})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "ids[0]"
