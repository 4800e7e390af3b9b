"""The convergence ladder through the seam: the manager's real task runner and port, measuring
and steering scripted agents whose QEMU pre-copies as QEMU 10 does (tests/unit/agent_world/),
on a simulated clock; and the agent's mapping of the plan and the ladder's steps to QMP.

The guest of most tests writes 100 MB/s of new pages (twice the 50 MB/s link) plus 8 MiB that
device emulation rewrites constantly, which no vCPU throttle slows: it converges only once
throttled, and only with the downtime limit raised past what 8 MiB take on the link (~170 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmotion.agent.migration.params import stream_capabilities, stream_parameters, tune_parameters
from qmotion.api.migration import (
    UNLIMITED_BANDWIDTH,
    IncomingRequest,
    MigrationParams,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    QemuMigrationStatus,
)
from qmotion.api.server import MigrateRequest, TaskOut, TaskState
from qmotion.client.agent import AgentClient
from qmotion.client.errors import Conflict
from qmotion.migration.convergence import (
    THROTTLE_INCREMENT,
    DirtyMeasure,
    Limits,
    PathMeasure,
    plan,
)
from qmotion.migration.params import apply_plan
from qmotion.server.db import Database, Task, Vm
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.agent_world import (
    MIB,
    QEMU_CAPABILITIES,
    QEMU_ENUM_PARAMETERS,
    QEMU_PARAMETERS,
    Guest,
    Link,
    QmpError,
    World,
    check_capabilities,
    check_parameters,
)

LINK = Link(bandwidth_bps=50e6, rtt_ms=0.3)
SWEEP = 100e6  # twice the link
DMA = 8 * MIB
TWICE_THE_LINK = Guest(sweep_bps=SWEEP, dma_bytes=DMA)
PATCH = ("PATCH", "/v1/vms/vm1/migration")
TOKEN = "t" * 32

Hook = Callable[[World, int, str, str], None]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[World, Database]]:
    """vm1 on h1, a guest dirtying twice the link; the runner (with its ports) is handed the
    world's simulated clock."""
    w = World(link=LINK)
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    w.register_hosts(db)
    w.add_running_vm(db, "vm1", "h1", guest=TWICE_THE_LINK)
    yield w, db
    db.engine.dispose()


def _migrate(world: World, db: Database, req: MigrateRequest, hook: Hook | None = None) -> TaskOut:
    """One migration of vm1 h1 -> h2 through the task runner, to its end."""

    async def main() -> TaskOut:
        runner = TaskRunner(
            db, Inventory(db, world.connector()), clock=world.clock.monotonic, sleep=world.sleep
        )
        world.before_request = hook
        task = await runner.submit_migration("vm1", req)
        return await world.run_to_end(runner, task)

    return asyncio.run(main())


def _one_copy(world: World, db: Database, where: str) -> None:
    assert world.running_copies("vm1") == [where], world.requests[-20:]
    with db.session() as s:
        assert s.query(Vm).filter_by(name="vm1").one().host.name == where


def _received(world: World, host: str, kind: str) -> MigrationParams:
    (params,) = [p for h, k, p in world.params_received if h == host and k == kind]
    return params


def _qemu_set(world: World, host: str, command: str) -> list[dict[str, Any]]:
    return [a for h, vm, c, a in world.qmp if h == host and vm == "vm1" and c == command]


# ------------------------------------------------------------------ the port and the ladder


def test_twice_the_link_completes_once_throttled(world: tuple[World, Database]) -> None:
    w, db = world
    task = _migrate(w, db, MigrateRequest(to="h2"))
    assert task.state == TaskState.SUCCEEDED, task.error
    _one_copy(w, db, "h2")
    assert "vm1" not in w.vms["h1"]  # the source was released
    r = task.result
    assert r is not None
    assert r.warnings == []
    # The prediction, from the scripted guest as the agent measured it.
    p = r.prediction
    assert p is not None
    assert p.dirty_rate_bps == pytest.approx(SWEEP + DMA, rel=0.03)
    assert p.sweep_bps == pytest.approx(SWEEP, rel=0.03)
    assert p.bandwidth_bps == pytest.approx(LINK.bandwidth_bps) and p.bandwidth_from == "probe"
    assert "auto-converge" in p.measures and p.max_throttle_pct > 0
    # The source was told to converge: auto-converge armed, throttling from the start.
    got = _received(w, "h1", "outgoing")
    assert got.auto_converge and got.throttle_initial_pct > 0 and got.downtime_limit_ms == 20
    # and its QEMU (only the source's: QEMU does not check it across the ends) had the
    # capability when the stream started.
    (src_caps,) = _qemu_set(w, "h1", "migrate-set-capabilities")
    (dst_caps,) = _qemu_set(w, "h2", "migrate-set-capabilities")
    assert {"capability": "auto-converge", "state": True} in src_caps["capabilities"]
    assert {"capability": "auto-converge", "state": False} in dst_caps["capabilities"]
    # The ladder: the throttle rung, the downtime limit raised on QEMU, the flight recorded.
    assert "throttle" in r.rungs
    assert any(t.get("downtime-limit", 0) > 20 for t in w.tunes("h1", "vm1"))
    assert r.max_throttle_pct >= 50 and r.throttled_s > 0
    assert r.samples and r.samples[-1].downtime_limit_ms > 20
    # The guest converged only once throttled, and the switchover met the raised limit.
    assert r.samples[-1].throttle_pct > 0
    assert r.downtime_ms is not None and 20 < r.downtime_ms <= r.samples[-1].downtime_limit_ms


def test_a_short_timeout_fails_with_the_source_running(world: tuple[World, Database]) -> None:
    w, db = world
    task = _migrate(w, db, MigrateRequest(to="h2", timeout_s=12))
    assert task.state == TaskState.FAILED
    assert task.error is not None and "completion timeout" in task.error
    _one_copy(w, db, "h1")
    assert "vm1" not in w.vms["h2"]  # the destination was removed
    src = w.vms["h1"]["vm1"]
    assert src.migration == "cancelled"
    assert src.qemu.throttle_pct == 0  # QEMU stops the throttle with the migration
    assert task.result is not None and task.result.leftovers == []
    # It was abandoned on time, while throttled, not after running on.
    assert 12 <= task.result.samples[-1].t_s < 13
    assert task.result.max_throttle_pct > 0


@pytest.mark.parametrize("route", ["/v1/vms/vm1/dirty-rate", "/v1/net/probe"])
def test_without_measurements_the_ladder_still_converges(
    world: tuple[World, Database], route: str
) -> None:
    w, db = world
    # The probe is asked twice (the route, then the measurement): both fail.
    w.fail_next[("POST", route)] = [503, 503]
    task = _migrate(w, db, MigrateRequest(to="h2"))
    assert task.state == TaskState.SUCCEEDED, task.error
    _one_copy(w, db, "h2")
    r = task.result
    assert r is not None and r.prediction is None
    assert any(x.startswith("no prediction") for x in r.warnings), r.warnings
    # Auto-converge armed but dormant, woken by the ladder from QEMU's own figures.
    got = _received(w, "h1", "outgoing")
    assert got.auto_converge and got.throttle_initial_pct == 0
    assert "throttle" in r.rungs and r.max_throttle_pct > 0
    assert any("cpu-throttle-initial" in t for t in w.tunes("h1", "vm1"))


def test_a_failed_tune_is_recorded_and_asked_again(world: tuple[World, Database]) -> None:
    w, db = world
    w.fail_next[PATCH] = [500]
    task = _migrate(w, db, MigrateRequest(to="h2"))
    assert task.state == TaskState.SUCCEEDED, task.error
    _one_copy(w, db, "h2")
    r = task.result
    assert r is not None
    assert any(x.startswith("could not apply") for x in r.warnings), r.warnings
    patches = [q for q in w.requests if q[1:] == PATCH]
    assert len(patches) >= 2  # asked again after the failure
    # QEMU got the raised limit (the switchover needed it) and the report says what applied.
    applied = [t["downtime-limit"] for t in w.tunes("h1", "vm1") if "downtime-limit" in t]
    assert applied and applied[-1] > 20
    assert r.samples[-1].downtime_limit_ms == applied[-1]


def test_completion_racing_a_tune_goes_forward(world: tuple[World, Database]) -> None:
    """QEMU completes just before the ladder's tune reaches the agent: the agent refuses it
    (no outgoing migration to tune, 409) and the migration goes forward."""
    w, db = world

    def complete_before_the_tune(w: World, k: int, host: str, path: str) -> None:
        if w.requests[-1][1:] == PATCH:
            w.complete("vm1")

    task = _migrate(w, db, MigrateRequest(to="h2"), hook=complete_before_the_tune)
    assert task.state == TaskState.SUCCEEDED, task.error
    _one_copy(w, db, "h2")
    assert task.result is not None
    assert any(
        x.startswith("could not apply") and "no outgoing migration to tune" in x
        for x in task.result.warnings
    ), task.result.warnings


# ------------------------------------------------------------------ the scripted agent itself


def _client(world: World, host: str) -> AgentClient:
    return world.connector().client(f"http://agent-{host}.test:7100", TOKEN)


def _start(world: World, params: MigrationParams) -> None:
    spec = world.vms["h1"]["vm1"].spec
    with _client(world, "h2") as dst, _client(world, "h1") as src:
        uri = dst.incoming(IncomingRequest(spec=spec, params=params)).uri
        src.migrate("vm1", OutgoingRequest(uri=uri, params=params))


def _poll(world: World, seconds: float) -> list[MigrationStats]:
    """Progress queries, as the port makes them, for ``seconds`` of simulated time."""
    end = world.clock.t + seconds
    with _client(world, "h1") as src:
        seen = [src.migration("vm1")]
        while world.clock.t < end and seen[-1].status == QemuMigrationStatus.ACTIVE:
            seen.append(src.migration("vm1", wait_ms=500, known_status=seen[-1].status))
    return seen


def test_the_scripted_guest_outruns_the_link_until_throttled(
    world: tuple[World, Database],
) -> None:
    w, _ = world
    _start(w, MigrationParams(auto_converge=False, downtime_limit_ms=300))
    seen = _poll(w, 120)
    assert seen[-1].status == QemuMigrationStatus.ACTIVE
    assert {s.throttle_pct for s in seen} == {0}
    assert seen[-1].passes > 10  # each pass finds all of it dirty again
    assert max(s.remaining for s in seen[-20:]) > 200 * MIB


def test_the_scripted_qemu_throttles_at_its_own_pace(world: tuple[World, Database]) -> None:
    w, _ = world
    _start(w, MigrationParams(auto_converge=True, throttle_initial_pct=60))
    # Two syncs that found more dirtied than half of what was sent, then 60 %.
    early = _poll(w, 8)[-1]
    assert early.status == QemuMigrationStatus.ACTIVE and early.throttle_pct == 0
    assert _poll(w, 5)[-1].throttle_pct == 60
    # A running throttle is not moved by a new initial value, only by QEMU's increment.
    with _client(w, "h1") as src:
        src.tune_migration("vm1", MigrationTune(throttle_pct=90, downtime_limit_ms=300))
    assert w.vms["h1"]["vm1"].qemu.throttle_pct == 60
    seen = _poll(w, 60)
    assert seen[-1].status == QemuMigrationStatus.COMPLETED
    steps = {s.throttle_pct for s in seen if s.status == QemuMigrationStatus.ACTIVE}
    assert steps <= {60 + k * THROTTLE_INCREMENT for k in range(3)}, steps
    assert w.running_copies("vm1") == ["h2"]
    assert w.vms["h1"]["vm1"].qemu.throttle_pct == 0


def test_the_scripted_agent_tunes_only_an_outgoing_migration(
    world: tuple[World, Database],
) -> None:
    """409 as Migrations.tune: before the migration, on the destination, after the end."""
    w, _ = world
    tune = MigrationTune(downtime_limit_ms=100)
    with _client(w, "h1") as src, pytest.raises(Conflict):
        src.tune_migration("vm1", tune)
    _start(w, MigrationParams(auto_converge=True))
    with _client(w, "h2") as dst, pytest.raises(Conflict):
        dst.tune_migration("vm1", tune)
    with _client(w, "h1") as src:
        assert src.tune_migration("vm1", tune).status == QemuMigrationStatus.ACTIVE
        assert w.complete("vm1")
        with pytest.raises(Conflict):
            src.tune_migration("vm1", tune)


# ------------------------------------------------------------------ the agent's QMP mapping

THROTTLE_KEYS = ("cpu-throttle-initial", "cpu-throttle-increment", "throttle-trigger-threshold")


def _in_qemu_ranges(params: dict[str, Any]) -> None:
    """Names QEMU 10 knows, values in its documented ranges (qapi/migration.json), and its
    own check (migrate_params_check)."""
    assert set(params) <= set(QEMU_PARAMETERS) | set(QEMU_ENUM_PARAMETERS), params
    if any(k in params for k in THROTTLE_KEYS):
        assert set(THROTTLE_KEYS) <= set(params), params  # all three, or QEMU's defaults mix in
        assert 1 <= params["cpu-throttle-initial"] <= 99
        assert 1 <= params["cpu-throttle-increment"] <= 99
        assert 1 <= params["throttle-trigger-threshold"] <= 100
    if "max-cpu-throttle" in params:
        assert params.get("cpu-throttle-initial", 20) <= params["max-cpu-throttle"] <= 99
    if "downtime-limit" in params:
        assert 0 <= params["downtime-limit"] <= 2_000_000
    if "xbzrle-cache-size" in params:
        size = params["xbzrle-cache-size"]
        assert size >= 4096 and size & (size - 1) == 0, size
    check_parameters(params)


def test_the_plan_maps_to_qemus_parameter_names() -> None:
    throttled = stream_parameters(
        MigrationParams(
            downtime_limit_ms=20,
            auto_converge=True,
            throttle_initial_pct=76,
            xbzrle_cache_bytes=128 * MIB,
        )
    )
    _in_qemu_ranges(throttled)
    assert throttled["max-bandwidth"] == UNLIMITED_BANDWIDTH
    assert throttled["downtime-limit"] == 20
    assert throttled["cpu-throttle-initial"] == 76
    assert throttled["cpu-throttle-increment"] == THROTTLE_INCREMENT
    assert throttled["throttle-trigger-threshold"] == 50
    assert throttled["xbzrle-cache-size"] == 128 * MIB
    # Armed but dormant: QEMU's smallest throttle, triggered only when dirtying outruns sending.
    dormant = stream_parameters(MigrationParams(auto_converge=True))
    _in_qemu_ranges(dormant)
    assert dormant["cpu-throttle-initial"] == 1
    assert dormant["throttle-trigger-threshold"] == 100
    plain = stream_parameters(MigrationParams())
    _in_qemu_ranges(plain)
    assert not set(THROTTLE_KEYS) & set(plain) and "xbzrle-cache-size" not in plain


def test_the_ladders_steps_map_to_qemus_parameter_names() -> None:
    step = tune_parameters(MigrationTune(downtime_limit_ms=300, throttle_pct=60))
    _in_qemu_ranges(step)
    assert step["downtime-limit"] == 300
    assert step["cpu-throttle-initial"] == 60
    assert step["cpu-throttle-increment"] == THROTTLE_INCREMENT
    assert step["throttle-trigger-threshold"] == 50
    # A wake-up must be accepted on top of the dormant settings (QEMU checks the merge).
    dormant = stream_parameters(MigrationParams(auto_converge=True))
    check_parameters({k: v for k, v in dormant.items() if k != "max-bandwidth"} | step)
    assert tune_parameters(MigrationTune(downtime_limit_ms=150)) == {"downtime-limit": 150}
    assert tune_parameters(MigrationTune()) == {}


@given(
    downtime=st.integers(1, 60_000),
    auto_converge=st.booleans(),
    initial=st.integers(0, 99),
    xbzrle=st.one_of(st.just(0), st.integers(1, 1 << 40)),
    tune_downtime=st.one_of(st.none(), st.integers(1, 60_000)),
    tune_throttle=st.one_of(st.none(), st.integers(1, 99)),
)
def test_every_valid_request_is_one_qemu_accepts(
    downtime: int,
    auto_converge: bool,
    initial: int,
    xbzrle: int,
    tune_downtime: int | None,
    tune_throttle: int | None,
) -> None:
    params = MigrationParams(
        downtime_limit_ms=downtime,
        auto_converge=auto_converge,
        throttle_initial_pct=initial,
        xbzrle_cache_bytes=xbzrle,
    )
    mapped = stream_parameters(params)
    _in_qemu_ranges(mapped)
    if xbzrle:  # the size asked for, to a power of two QEMU takes
        assert xbzrle // 2 < mapped["xbzrle-cache-size"] <= max(xbzrle, 4096)
    step = MigrationTune(downtime_limit_ms=tune_downtime, throttle_pct=tune_throttle)
    _in_qemu_ranges(tune_parameters(step))


@given(
    sweep=st.floats(0, 4e9),
    hot=st.floats(0, 4e9),
    bw=st.floats(1e6, 5e9),
    memory_mib=st.integers(64, 65536),
    max_downtime=st.one_of(st.none(), st.integers(1, 60_000)),
)
def test_every_plan_is_one_qemu_accepts(
    sweep: float, hot: float, bw: float, memory_mib: int, max_downtime: int | None
) -> None:
    memory = memory_mib << 20
    p = plan(
        memory,
        memory,
        DirtyMeasure(sweep_bps=sweep, hot_bytes=hot),
        PathMeasure(bw),
        Limits(max_downtime_ms=max_downtime),
    )
    # With the streams a path or TLS asks for: QEMU refuses some pairs (xbzrle + multifd).
    for streams in (0, 2, 8):
        params = apply_plan(MigrationParams(multifd_channels=streams), p)
        for source in (True, False):
            check_capabilities(stream_capabilities(params, source=source))
        _in_qemu_ranges(stream_parameters(params))


def test_auto_converge_is_switched_on_only_on_the_source() -> None:
    def caps(params: MigrationParams, source: bool) -> dict[str, bool]:
        return {c["capability"]: c["state"] for c in stream_capabilities(params, source=source)}

    armed = MigrationParams(auto_converge=True, xbzrle_cache_bytes=64 * MIB)
    assert caps(armed, source=True)["auto-converge"] is True
    assert caps(armed, source=False)["auto-converge"] is False
    assert caps(MigrationParams(), source=True)["auto-converge"] is False
    # xbzrle on both ends (the destination decodes), only with a cache.
    assert caps(armed, source=True)["xbzrle"] and caps(armed, source=False)["xbzrle"]
    assert not caps(MigrationParams(), source=True)["xbzrle"]
    # Names QEMU 10 knows (migrate_caps_check refuses others).
    assert set(caps(armed, source=True)) <= set(QEMU_CAPABILITIES)


def test_the_scripted_qemu_refuses_what_qemu_refuses() -> None:
    for bad in (
        {"cpu-throttle-initial": 0},
        {"cpu-throttle-initial": 100},
        {"cpu-throttle-increment": 100},
        {"throttle-trigger-threshold": 101},
        {"xbzrle-cache-size": 3 * MIB},
        {"downtime-limit": 2_000_001},
        {"cpu-throttle": 50},
    ):
        with pytest.raises(QmpError):
            check_parameters(bad)


def test_a_dry_run_measures_predicts_and_starts_nothing(world: tuple[World, Database]) -> None:
    w, db = world

    async def main() -> Any:
        runner = TaskRunner(
            db, Inventory(db, w.connector()), clock=w.clock.monotonic, sleep=w.sleep
        )
        return await runner.predict_migration("vm1", MigrateRequest(to="h2"))

    p = asyncio.run(main())
    assert p.sweep_bps == pytest.approx(SWEEP, rel=0.03)
    assert "auto-converge" in p.measures and p.converges
    assert p.bandwidth_from == "probe" and p.bandwidth_bps == pytest.approx(50e6, rel=0.05)
    # Nothing began: no incoming QEMU, no migrate, no task, the VM where it was.
    paths = {(m, path) for _, m, path in w.requests}
    assert ("POST", "/v1/migrations/incoming") not in paths
    assert ("POST", "/v1/vms/vm1/migration") not in paths
    _one_copy(w, db, "h1")
    with db.session() as s:
        assert s.query(Task).count() == 0
