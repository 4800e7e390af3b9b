"""The agent's health report: degraded when a datastore VMs live on cannot be written."""

from __future__ import annotations

from pathlib import Path

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.facts import _health


def _config(tmp_path: Path, *stores: DatastoreConfig) -> AgentConfig:
    return AgentConfig(name="h1", state_dir=tmp_path, token="t" * 32, datastores=stores)


def test_healthy_datastores_are_ok(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    cfg = _config(tmp_path, DatastoreConfig("local", tmp_path / "ds", False))
    assert _health(cfg) == {"health": "ok", "health_reasons": []}


def test_a_missing_datastore_degrades_the_host_naming_it(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    cfg = _config(
        tmp_path,
        DatastoreConfig("local", tmp_path / "ds", False),
        DatastoreConfig("nfs", tmp_path / "gone", True),
    )
    out = _health(cfg)
    assert out["health"] == "degraded"
    assert len(out["health_reasons"]) == 1 and out["health_reasons"][0].startswith("datastore nfs")


def test_a_hanging_datastore_check_degrades_without_hanging_the_facts(tmp_path: Path) -> None:
    import asyncio
    import threading

    from qmotion.agent.facts import HealthCheck

    release, calls = threading.Event(), []

    def hangs(_cfg: AgentConfig) -> dict[str, object]:
        calls.append(1)
        release.wait(5)  # a hard NFS mount whose server is gone
        return {"health": "ok", "health_reasons": []}

    async def main() -> None:
        check = HealthCheck(_config(tmp_path), timeout_s=0.1, probe=hangs)
        first = await check.check()
        assert first["health"] == "degraded" and "did not answer" in first["health_reasons"][0]
        await check.check()
        assert len(calls) == 1  # the stuck check is awaited again, not started twice
        release.set()
        await asyncio.sleep(0.05)
        assert (await check.check())["health"] == "ok"

    asyncio.run(main())
