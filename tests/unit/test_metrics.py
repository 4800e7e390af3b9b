"""Prometheus ``/metrics`` on the manager and on an agent, scraped over their real apps.

The manager runs over scripted agents; the agent starts no guest.

The manager's figures come from the database at each scrape: a migration the manager ran
shows up in the counters and histograms with the task's own figures, the task queue and the
hosts' states as the inventory has them, and a restarted manager (a new app on the same
database) reports the same counts. The agent's are its VMs' states and its sampler's host
and VM figures.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from qmotion.agent import prometheus
from qmotion.agent.app import create_app as create_agent
from qmotion.agent.config import AgentConfig
from qmotion.api.host import HostMetrics, VmMetrics
from qmotion.api.server import TaskState
from qmotion.api.vm import VmState
from qmotion.server.db import Database, Host, Task, utcnow
from tests.unit.agent_world import World
from tests.unit.manager_app import Client
from tests.unit.manager_app import run_manager as _manager
from tests.unit.manager_app import wait_task as _wait

GIB = 1 << 30
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of the exposition: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _cluster(tmp_path: Path) -> tuple[World, str]:
    """h1 with vm0..vm2, h2 empty, h3 down; one cold migration that failed after 40 s and one
    storage move that succeeded in 3 s, recorded before this manager started; vm2 queued."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    world = World(hosts=("h1", "h2", "h3"), polls_to_complete=2)
    for h in world.hosts:
        world.facts_override[h] = {"cpus": 4, "memory_bytes": 8 * GIB}
    world.register_hosts(db)
    for name in ("vm0", "vm1", "vm2"):
        world.add_running_vm(db, name, "h1")
    start = utcnow() - timedelta(hours=1)
    with db.session() as s:
        s.query(Host).filter_by(name="h3").one().state = "down"
        for kind, state, seconds in (
            ("cold-migrate", "failed", 40),
            ("storage-move", "succeeded", 3),
        ):
            s.add(
                Task(
                    kind=kind,
                    state=state,
                    vm="vm1",
                    source="h1",
                    destination="h2",
                    started_at=start,
                    ended_at=start + timedelta(seconds=seconds),
                )
            )
        s.add(Task(kind="migrate", state="queued", vm="vm2", source="h1", destination="h2"))
    db.engine.dispose()
    return world, url


def test_manager_metrics_count_what_the_database_holds(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)
    seen: dict[str, float] = {}

    async def first(c: Client) -> None:
        r = await c.get("/metrics", headers={"Authorization": ""})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        before = parse((await c.get("/metrics")).text)
        assert value(before, "qmotion_migrations_total", kind="migrate", state="succeeded") == 0

        r = await c.post("/v1/vms/vm0/migrate", json={"to": "h2"})
        assert r.status_code == 202, r.text
        task = await _wait(c, r.json()["id"])
        assert task.state == TaskState.SUCCEEDED, task.error
        assert task.result is not None and task.result.downtime_ms is not None
        assert task.result.bytes and task.started_at and task.ended_at

        r = await c.get("/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        got = parse(r.text)
        m = "qmotion_migrations_total"
        assert value(got, m, kind="migrate", state="succeeded") == 1
        assert value(got, m, kind="migrate", state="failed") == 0
        assert value(got, m, kind="cold-migrate", state="failed") == 1
        assert value(got, m, kind="storage-move", state="succeeded") == 1

        # The live migration's downtime, as its result records it, in seconds.
        d = "qmotion_migration_downtime_seconds"
        assert value(got, f"{d}_count") == 1
        assert value(got, f"{d}_sum") == task.result.downtime_ms / 1000
        # Durations: task started -> ended; the storage move's 3 s is in le=5, not in le=2.5.
        h = "qmotion_migration_duration_seconds"
        assert value(got, f"{h}_bucket", kind="storage-move", le="2.5") == 0
        assert value(got, f"{h}_bucket", kind="storage-move", le="5.0") == 1
        assert value(got, f"{h}_sum", kind="storage-move") == 3
        # A failed migration has no duration: the cold one's 40 s is counted nowhere.
        assert value(got, f"{h}_count", kind="cold-migrate") == 0
        live_s = (task.ended_at - task.started_at).total_seconds()
        assert value(got, f"{h}_sum", kind="migrate") == live_s
        assert value(got, "qmotion_migration_sent_bytes_total", stream="ram") == task.result.bytes
        assert value(got, "qmotion_migration_sent_bytes_total", stream="disk") == 0

        assert value(got, "qmotion_tasks_active", state="queued") == 1
        assert value(got, "qmotion_tasks_active", state="running") == 0
        assert value(got, "qmotion_vms", state="running") == 3
        assert value(got, "qmotion_vms", state="stopped") == 0
        assert value(got, "qmotion_host_vms", host="h2") == 1
        for host, state in (("h1", "up"), ("h2", "up"), ("h3", "down")):
            assert value(got, "qmotion_host_state", host=host, state=state) == 1
            assert value(got, "qmotion_host_state", host=host, state="maintenance") == 0
        drs = (await c.get("/v1/drs/state")).json()
        assert value(got, "qmotion_drs_imbalance") == drs["imbalance"] > 0
        assert value(got, "qmotion_drs_broken_must_rules") == 0
        seen.update(ram=task.result.bytes, live_s=live_s)

    _manager(world, url, first)

    async def restarted(c: Client) -> None:
        got = parse((await c.get("/metrics")).text)
        assert value(got, "qmotion_migrations_total", kind="migrate", state="succeeded") == 1
        assert value(got, "qmotion_migration_sent_bytes_total", stream="ram") == seen["ram"]
        h = "qmotion_migration_duration_seconds"
        assert value(got, f"{h}_sum", kind="migrate") == seen["live_s"]

    _manager(world, url, restarted)


def test_metrics_route_is_documented_as_text_with_json_errors(tmp_path: Path) -> None:
    world, url = _cluster(tmp_path)

    async def test(c: Client) -> None:
        op = (await c.get("/openapi.json")).json()["paths"]["/metrics"]["get"]
        assert list(op["responses"]["200"]["content"]) == ["text/plain"]
        assert op["security"], op  # the bearer token, as every /v1 route
        ref = op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")

    _manager(world, url, test)


# ---------------------------------------------------------------------- the agent


def test_agent_metrics_count_its_vms_and_show_its_sampler(tmp_path: Path) -> None:
    token = "a" * 32
    config = AgentConfig(
        name="h9", state_dir=tmp_path / "s", token=token, run_dir=tmp_path / "r", accel="tcg"
    )
    config.state_dir.mkdir()
    with TestClient(create_agent(config)) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        c.headers["Authorization"] = f"Bearer {token}"
        for name in ("vm1", "vm2"):
            assert c.post("/v1/vms", json={"name": name, "memory": "256M"}).status_code == 201
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        got = parse(r.text)
        host = HostMetrics.model_validate(c.get("/v1/metrics").json())
    assert value(got, "qmotion_agent_vms", state="stopped") == 2
    assert value(got, "qmotion_agent_vms", state="running") == 0
    assert value(got, "qmotion_agent_host_cpus") == host.cpus > 0
    assert value(got, "qmotion_agent_host_memory_total_bytes") == host.memory_total_bytes > 0
    assert 0 <= value(got, "qmotion_agent_host_cpu_busy_ratio") <= 1
    assert value(got, "qmotion_agent_vms_memory_bytes") == 0  # none runs
    for direction in ("outgoing", "incoming"):
        assert value(got, "qmotion_agent_migrations_in_progress", direction=direction) == 0


def test_agent_figures_per_vm_and_migrations_under_way() -> None:
    host = HostMetrics(
        sampled_at=datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
        cpus=8,
        cpu_percent=37.5,
        memory_total_bytes=64 << 30,
        memory_available_bytes=40 << 30,
        vms_memory_mib=3072,
        vms=[
            VmMetrics(name="web", cpu_percent=150.0, rss_bytes=900 << 20, memory_mib=1024),
            VmMetrics(
                name="db",
                cpu_percent=20.0,
                rss_bytes=2 << 30,
                memory_mib=2048,
                dirty_rate_mib_s=12.5,
            ),
        ],
    )
    states = [VmState.RUNNING, VmState.RUNNING, VmState.SUSPENDED]
    got = parse(prometheus.exposition(host, states, outgoing=1, incoming=2).decode())
    assert value(got, "qmotion_agent_vms", state="running") == 2
    assert value(got, "qmotion_agent_vms", state="suspended") == 1
    assert value(got, "qmotion_agent_vms", state="crashed") == 0
    assert value(got, "qmotion_agent_host_cpu_busy_ratio") == 0.375
    assert value(got, "qmotion_agent_host_memory_available_bytes") == 40 << 30
    assert value(got, "qmotion_agent_vms_memory_bytes") == 3 << 30
    assert (
        value(got, "qmotion_agent_metrics_sampled_timestamp_seconds") == host.sampled_at.timestamp()
    )
    assert value(got, "qmotion_agent_vm_cpus_busy", vm="web") == 1.5
    assert value(got, "qmotion_agent_vm_rss_bytes", vm="db") == 2 << 30
    assert value(got, "qmotion_agent_vm_dirty_rate_bytes_per_second", vm="db") == 12.5 * (1 << 20)
    # Not measured yet: no sample, rather than a made-up zero.
    assert ("qmotion_agent_vm_dirty_rate_bytes_per_second", frozenset({("vm", "web")})) not in got
    assert value(got, "qmotion_agent_migrations_in_progress", direction="outgoing") == 1
    assert value(got, "qmotion_agent_migrations_in_progress", direction="incoming") == 2
