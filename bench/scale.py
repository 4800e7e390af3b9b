"""Scale, measured: the real manager against N simulated host agents, in-process, per backend.

    python bench/scale.py --hosts 100,300,1000 --vms-per-host 20 --backend sqlite,postgresql \
        --managers 1,2 --out bench/results/scale.json [--plot docs/scale.png] [--quick]

Each row (backend, managers, hosts) runs in its own child process (killed at ``--row-timeout``;
every phase inside it has its own timeout, and the row's figures are written after each
phase, so a row cut short still reports what it measured). In it: ``create_app`` (one per
manager, all on the row's fresh database, each its own replica name where create_app takes
one) with ``AgentConnector(transport=SimCluster.transport)`` (bench/sim_agents.py: each agent
request waits ``--agent-latency-ms``, and calls that block a real agent block as long). The
lifespan is not started (``--lifespan`` starts it): its refresh and DRS loops would land in
the measurements; each runner only joins as a replica (``recover_after_restart``) and keeps
its lease. The phases, each manager on its own in turn:

- populate: hosts registered through the API (``POST /v1/hosts``, which asks each agent its
  facts); VMs inserted as rows (``qmotion.server.db.Vm``) in one bulk insert, and the same VMs
  given to the simulated agents so reconcile finds nothing to fix. Through the API a VM costs
  O(VMs) (``committed``, ``_allocate_mac`` read every VM): 20 000 of them would take hours.
- refresh: ``inventory.refresh_hosts`` as ``_refresh_forever`` calls it (DRS's grace, metrics
  into a ``ClusterDrs`` demand window), ``--rounds`` times; then one ``Reconciler.run`` round.
  CPU is the manager's process time less what the simulated agents spent (sim_agents counts
  it per thread); target: the round within the 15 s interval, under 1 core (cpu_s / 15).
- DRS: ``ClusterDrs.snapshot(cooldown=True)`` alone, then ``ClusterDrs.run`` (snapshot, plan,
  recommendations stored), on the measured demand; the ClusterDrs is built here from the app's
  database, inventory and runner (the app keeps its own out of reach); target 10 s.
- migrations: ``--migrations`` live migrations of distinct VMs, targets spread evenly,
  submitted at once through ``POST /v1/vms/{vm}/migrate`` (round robin over the managers) and
  waited for. Every 50 ms a sampler thread reads the running tasks per host (the tasks table:
  the cluster's count, whatever replica runs them) and the slots each runner holds per host;
  the agents count the migrations touching each host. Checked: every accepted task ended
  (none lost), one task per VM (none doubled), at most 4 per host at once (all three counts),
  the inventory names each moved VM's new host, one running copy of each VM at the end.
- API: ``GET /v1/vms?limit=100`` (cursors spread over the list) and ``GET /v1/tasks?limit=100``,
  ~50 each, through ``httpx.ASGITransport`` (in-process: no socket, no uvicorn; the route's
  thread pool and middleware are the app's); target p95 100 ms. Also the VM list sampled
  every 0.5 s while the migrations ran.
- database size (SQLite: file and WAL; PostgreSQL: ``pg_database_size``) and the queries each
  phase issued (``before_cursor_execute`` on each manager's engine), per second of the phase.

Two managers share the CPU of one process here: their phases run one after the other (each
as if it had the machine), except the migrations, split across both at once. PostgreSQL's
server CPU is not in the manager's figures. ``--db-url`` names the database of its backend
(by scheme) instead of a throwaway one: its qmotion tables are dropped at each row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

if __package__ in (None, ""):  # run as a file (python bench/scale.py): the repository's root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from fastapi import FastAPI
from sqlalchemy import MetaData, create_engine, event, insert, select, text

from bench.sim_agents import SimCluster, agent_url
from qmotion.server.agents import AgentConnector
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.operations import Operations
from qmotion.server.db import Base, Host, Task, Vm, utcnow
from qmotion.server.http.app import REFRESH_INTERVAL_S, create_app
from qmotion.server.reconciler import Reconciler
from qmotion.server.tasks.runner import DEFAULT_PER_HOST, TaskRunner

T = TypeVar("T")
TOKEN = "scale-bench-manager-token-0123"
AGENT_TOKEN = "scale-bench-agent-token-0123"
DRS_TARGET_S, P95_TARGET_MS = 10.0, 100.0
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class RowConfig:
    backend: str
    managers: int
    hosts: int
    vms_per_host: int
    db_url: str | None
    migrations: int
    rounds: int
    requests: int
    latency_ms: float
    executor_workers: int | None
    phase_timeout_s: float
    migration_timeout_s: float
    lifespan: bool


@dataclass
class Manager:
    """One manager: its app and the parts of it the bench drives."""

    app: FastAPI
    runner: TaskRunner
    drs: ClusterDrs
    reconciler: Reconciler
    client: httpx.AsyncClient
    queries: list[int] = field(default_factory=lambda: [0])


def build_manager(url: str, sim: SimCluster, index: int) -> Manager:
    # Replicas on one database need names of their own (where create_app takes one).
    named = "replica" in inspect.signature(create_app).parameters
    extra: dict[str, Any] = {"replica": f"bench-{index}"} if named else {}
    app = create_app(url, TOKEN, agents=AgentConnector(transport=sim.transport), **extra)
    runner = cast(TaskRunner, app.state.runner)
    m = Manager(
        app,
        runner,
        ClusterDrs(runner.db, runner.inventory, Operations(runner.db, runner)),
        Reconciler(runner.inventory),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://manager",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120.0,
        ),
    )

    def count(*_: Any) -> None:
        m.queries[0] += 1

    event.listen(runner.db.engine, "before_cursor_execute", count)
    return m


# ---------------------------------------------------------------------------- measuring


def measured(sim: SimCluster, m: Manager, fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``fn`` in this thread: its wall time, the manager's CPU (process time less the
    simulated agents' own), and its queries."""
    me = threading.get_ident()
    q0, sim0, own0 = m.queries[0], sim.sim_cpu(), sim.sim_cpu(me)
    w0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    out = fn()
    wall = time.perf_counter() - w0
    sim_all, sim_me = sim.sim_cpu() - sim0, sim.sim_cpu(me) - own0
    return out, {
        "wall_s": round(wall, 4),
        "cpu_s": round(time.process_time() - p0 - sim_all, 4),
        "thread_cpu_s": round(time.thread_time() - t0 - sim_me, 4),
        "sim_cpu_s": round(sim_all, 4),
        "queries": m.queries[0] - q0,
        "qps": round((m.queries[0] - q0) / wall, 1) if wall > 0 else 0.0,
    }


async def bounded(row: dict[str, Any], phase: str, limit_s: float, work: Awaitable[T]) -> T | None:
    """``work``, given up after ``limit_s`` (a thread it runs in goes on: the row's process
    exits without waiting for it); a failure is the row's error, not the run's."""
    try:
        return await asyncio.wait_for(work, limit_s)
    except TimeoutError:
        row["errors"].append(f"{phase}: not done within {limit_s:.0f} s")
    except Exception as exc:  # one phase failing still reports the others
        row["errors"].append(f"{phase}: {type(exc).__name__}: {exc}"[:500])
    return None


def pct(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not samples:
        return None
    s = sorted(samples)
    return round(s[max(math.ceil(q * len(s)) - 1, 0)] * 1000, 2)


# ---------------------------------------------------------------------------- phases


async def populate(cfg: RowConfig, sim: SimCluster, m: Manager) -> dict[str, Any]:
    """Hosts through the API (16 at a time), VMs as rows in one insert (see the docstring)."""
    placed = sim.build(cfg.hosts, cfg.vms_per_host)
    gate = asyncio.Semaphore(16)

    async def register(h: str) -> None:
        async with gate:
            body = {"name": h, "agent_url": agent_url(h), "token": AGENT_TOKEN}
            (await m.client.post("/v1/hosts", json=body)).raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(register(h) for h in sim.hosts))
    hosts_s = time.perf_counter() - t0

    def insert_vms() -> None:
        with m.runner.db.session() as s:
            ids = {h.name: h.id for h in s.scalars(select(Host))}
            rows = [
                {"name": spec.name, "uuid": str(spec.uuid), "mac": spec.nics[0].mac}
                | {"host_id": ids[host], "state": "running", "spec": spec.model_dump(mode="json")}
                | {"memory_mib": spec.memory, "created_at": utcnow()}
                for host, spec in placed
            ]
            s.execute(insert(Vm), rows)

    t0 = time.perf_counter()
    await asyncio.to_thread(insert_vms)
    return {"hosts_s": round(hosts_s, 2), "vms_s": round(time.perf_counter() - t0, 2)}


async def refresh(cfg: RowConfig, sim: SimCluster, m: Manager) -> dict[str, Any]:
    grace = (await asyncio.to_thread(m.drs.config.settings)).down_grace_s
    rounds = []
    for _ in range(cfg.rounds):
        r0 = sum(sim.requests.values())
        _, fig = await asyncio.to_thread(
            measured,
            sim,
            m,
            lambda: m.runner.inventory.refresh_hosts(grace, lambda _h, x: m.drs.sample(x)),
        )
        rounds.append(fig | {"agent_requests": sum(sim.requests.values()) - r0})
    actions, rec = await asyncio.to_thread(measured, sim, m, m.reconciler.run)
    walls, cpus = [r["wall_s"] for r in rounds], [r["cpu_s"] for r in rounds]
    return {
        "rounds": rounds,
        "refresh_round_s": round(statistics.median(walls), 3),
        "refresh_cpu_s": round(statistics.median(cpus), 3),
        "cpu_fraction": round(statistics.median(cpus) / REFRESH_INTERVAL_S, 3),
        "refresh_queries": rounds[-1]["queries"],
        "reconcile": rec | {"actions": len(actions)},
        "period_s": round(REFRESH_INTERVAL_S + statistics.median(walls) + rec["wall_s"], 2),
    }


async def drs_round(sim: SimCluster, m: Manager) -> dict[str, Any]:
    _, snap = await asyncio.to_thread(measured, sim, m, lambda: m.drs.snapshot(cooldown=True))
    out, run = await asyncio.to_thread(measured, sim, m, m.drs.run)
    return {
        "snapshot": snap,
        "run": run,
        "drs_round_s": run["wall_s"],
        "moves": len(out.recommendations),
        "measured_vms": out.measured_vms,
        "imbalance": [round(out.imbalance_before, 4), round(out.imbalance_after, 4)],
    }


async def api_latency(cfg: RowConfig, m: Manager, names: list[str]) -> dict[str, Any]:
    async def timed(path: str, params: dict[str, str]) -> float:
        t0 = time.perf_counter()
        r = await m.client.get(path, params=params)
        r.raise_for_status()
        return time.perf_counter() - t0

    q0 = m.queries[0]
    span = max(len(names) - 100, 1)
    vms = [
        await timed("/v1/vms", {"limit": "100"} | ({"after": names[j * 7919 % span]} if j else {}))
        for j in range(cfg.requests)
    ]
    q1 = m.queries[0]
    tasks = [await timed("/v1/tasks", {"limit": "100"}) for _ in range(cfg.requests)]
    return {
        "vms_p50_ms": pct(vms, 0.5),
        "vms_p95_ms": pct(vms, 0.95),
        "vms_queries": round((q1 - q0) / cfg.requests, 1),
        "tasks_p50_ms": pct(tasks, 0.5),
        "tasks_p95_ms": pct(tasks, 0.95),
        "tasks_queries": round((m.queries[0] - q1) / cfg.requests, 1),
    }


def plan_moves(cfg: RowConfig) -> list[tuple[str, str]]:
    """Distinct VMs, each host the source and the destination of as many moves as any other."""
    n, k = cfg.hosts, min(cfg.migrations, cfg.hosts * cfg.vms_per_host)
    moves = []
    for j in range(k):
        src, nth = j % n, j // n
        dst = (src + 1 + (n // 2 + nth) % max(n - 1, 1)) % n
        moves.append((f"vm{src * cfg.vms_per_host + nth:05d}", f"h{dst:04d}"))
    return moves


class Sampler(threading.Thread):
    """Migration tasks still active, and the most running per host, read every 50 ms from
    the tasks table (its own engine: not in the managers' query counts; off the loop), and
    the most slots one runner held on one host."""

    def __init__(self, url: str, managers: list[Manager]) -> None:
        super().__init__(daemon=True)
        self.url, self.managers, self.stop = url, managers, threading.Event()
        self.active, self.max_tasks, self.max_slots, self.samples = -1, 0, 0, 0

    def run(self) -> None:
        engine = create_engine(self.url)
        live = select(Task.state, Task.source, Task.destination).where(
            Task.kind == "migrate", Task.state.in_(("queued", "running"))
        )
        while not self.stop.wait(0.05):
            with engine.connect() as c:
                rows = c.execute(live).all()
            per = Counter(h for r in rows if r.state == "running" for h in (r[1], r[2]) if h)
            held = [0]
            for m in self.managers:  # each runner's own limit (the cluster's: the tasks)
                with contextlib.suppress(RuntimeError):  # the dict grew meanwhile
                    held += [m.runner.per_host - s.free for s in list(m.runner._slots.values())]
            self.max_tasks = max(self.max_tasks, *per.values(), 0)
            self.max_slots = max(self.max_slots, *held)
            self.active, self.samples = len(rows), self.samples + 1
        engine.dispose()


async def migrations(
    cfg: RowConfig, url: str, sim: SimCluster, ms: list[Manager], row: dict[str, Any]
) -> dict[str, Any]:
    moves = plan_moves(cfg)
    out: dict[str, Any] = {"submitted": len(moves)}
    row["phases"]["migrations"] = out
    sampler = Sampler(url, ms)
    sampler.start()
    q0, p0, sim0 = [m.queries[0] for m in ms], time.process_time(), sim.sim_cpu()
    statuses: Counter[int] = Counter()
    refusals: list[str] = []

    async def submit(j: int, vm: str, to: str) -> None:
        r = await ms[j % len(ms)].client.post(f"/v1/vms/{vm}/migrate", json={"to": to})
        statuses[r.status_code] += 1
        if r.status_code != 202 and len(refusals) < 5:
            refusals.append(f"{vm}: {r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(submit(j, vm, to) for j, (vm, to) in enumerate(moves)))
    submit_s = time.perf_counter() - t0
    out |= {"accepted": statuses[202], "statuses": dict(statuses), "refusals": refusals}
    out |= {"submit_s": round(submit_s, 3), "submits_per_s": round(len(moves) / submit_s, 1)}
    names = {vm for vm, _ in moves}
    load: list[float] = []
    deadline = time.monotonic() + cfg.migration_timeout_s
    try:
        while time.monotonic() < deadline and (sampler.active != 0 or sampler.samples < 2):
            l0 = time.perf_counter()
            await ms[0].client.get("/v1/vms", params={"limit": "100"})
            load.append(time.perf_counter() - l0)
            await asyncio.sleep(0.5)
        wall = time.perf_counter() - t0
    finally:
        sampler.stop.set()
        sampler.join(5)
    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(select(Task.vm, Task.state, Task.destination, Task.error)).all()
        where = {vm: host for vm, host in c.execute(select(Vm.name, Host.name).join(Host))}
    engine.dispose()
    ours = [r for r in rows if r.vm in names]
    per_vm = Counter(r.vm for r in ours)
    states = Counter(r.state for r in ours)
    ok = [r for r in ours if r.state == "succeeded"]
    copies = sim.copies()
    out |= {
        "wall_s": round(wall, 2),
        "states": dict(states),
        "lost": out["accepted"] - sum(states[s] for s in FINAL),
        "doubled": sum(1 for c in per_vm.values() if c > 1),
        "inventory_wrong": sum(1 for r in ok if where.get(r.vm) != r.destination),
        "copies_wrong": sum(1 for vm in names if len(copies.get(vm, [])) != 1),
        "max_per_host_tasks": sampler.max_tasks,
        "max_per_host_slots": sampler.max_slots,
        "max_per_host_agents": sim.max_concurrent(),
        "samples": sampler.samples,
        "errors": sorted({str(r.error)[:160] for r in ours if r.error})[:5],
        "vms_p95_under_load_ms": pct(load, 0.95),
        # The managers' process time less the agents', per migration: submit to end.
        "cpu_per_migration_s": round(
            (time.process_time() - p0 - sim.sim_cpu() + sim0) / max(out["accepted"], 1), 4
        ),
        "queries": sum(m.queries[0] for m in ms) - sum(q0),
        "qps": round((sum(m.queries[0] for m in ms) - sum(q0)) / wall, 1),
        "unhandled_agent_routes": dict(sim.unhandled),
    }
    return out


def db_bytes(url: str) -> int:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return int(c.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    finally:
        engine.dispose()


def reset(url: str) -> None:
    """A given database starts each row empty: the manager's tables (and the schema's
    revision, or the next manager would take the empty database for an upgraded one) go."""
    engine = create_engine(url)
    found = MetaData()
    found.reflect(engine)
    ours = {*Base.metadata.tables, "alembic_version"}
    found.drop_all(engine, tables=[t for t in found.sorted_tables if t.name in ours])
    engine.dispose()


async def run_row(cfg: RowConfig, out_file: Path) -> None:
    row: dict[str, Any] = {**asdict(cfg), "vms": cfg.hosts * cfg.vms_per_host}
    row |= {"errors": [], "phases": {}, "per_manager": []}
    row.pop("db_url")

    def save() -> None:
        out_file.write_text(json.dumps(row, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="qmscale-") as tmp:
        url = cfg.db_url or f"sqlite:///{tmp}/manager.db"
        if cfg.db_url:
            reset(url)
        sim = SimCluster(latency_s=cfg.latency_ms / 1000)
        ms = [build_manager(url, sim, i) for i in range(cfg.managers)]
        async with contextlib.AsyncExitStack() as stack:
            for m in ms:
                await stack.enter_async_context(m.client)
                if cfg.lifespan:
                    await stack.enter_async_context(m.app.router.lifespan_context(m.app))
                    continue
                # Without the lifespan's cluster-wide loops (a refresh every 15 s would land
                # in the measurements): the runner joins as a replica and keeps its lease.
                m.runner.recover_after_restart()
                if (keep := getattr(m.runner, "keep_leases", None)) is not None:
                    stack.callback(asyncio.ensure_future(keep()).cancel)
            budget = cfg.phase_timeout_s
            got = await bounded(row, "populate", budget, populate(cfg, sim, ms[0]))
            row["phases"]["populate"] = got
            save()
            if got is None:
                return
            names = [f"vm{i:05d}" for i in range(row["vms"])]
            for i, m in enumerate(ms):
                fig: dict[str, Any] = {"manager": i}
                row["per_manager"].append(fig)
                fig["refresh"] = await bounded(row, f"refresh[{i}]", budget, refresh(cfg, sim, m))
                save()
                fig["drs"] = await bounded(row, f"drs[{i}]", budget, drs_round(sim, m))
                save()
            await bounded(
                row,
                "migrations",
                cfg.migration_timeout_s + budget,
                migrations(cfg, url, sim, ms, row),
            )
            save()
            for i, m in enumerate(ms):
                got = await bounded(row, f"api[{i}]", budget, api_latency(cfg, m, names))
                row["per_manager"][i]["api"] = got
                save()
            row["db_bytes"] = db_bytes(url)
            row["agent_requests"] = dict(sim.requests.most_common())
            save()


# ---------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    # What the simulation leaves out: an agent on plain http gets a new httpx.Client per
    # call (AgentConnector.client), each building a TLS context for verify=True.
    t0 = time.process_time()
    for _ in range(10):
        httpx.Client(base_url="http://agent.invalid:7100").close()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).date().isoformat(),
        "accelerator": "none (simulated agents)",
        "default_executor_workers": min(32, (os.cpu_count() or 1) + 4),
        "httpx_client_cpu_ms": round((time.process_time() - t0) / 10 * 1000, 2),
    }


def postgres_url(stack: contextlib.ExitStack, given: str | None) -> str:
    """The given PostgreSQL database, or a throwaway cluster (qmotion.lab.postgres), fsync
    on where it offers that (``durable``): a production server's commits cost that too."""
    if given:
        return given
    try:
        throwaway = importlib.import_module("qmotion.lab.postgres").throwaway_postgres
    except (ImportError, AttributeError) as exc:
        sys.exit(
            "scale: --backend postgresql needs qmotion.lab.postgres.throwaway_postgres "
            f"({exc}); or give one with --db-url postgresql+psycopg://USER@HOST/DB"
        )
    top = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qmscale-pg-")))
    top.chmod(0o711)  # the server runs as its own user and reaches its directory through it
    durable = "durable" in inspect.signature(throwaway).parameters
    cluster = throwaway(top / "pg", durable=True) if durable else throwaway(top / "pg")
    return str(stack.enter_context(cluster))


def run_child(cfg: RowConfig, timeout: float) -> dict[str, Any]:
    """One row in its own process: a phase stuck in a thread cannot hold up the run."""
    with tempfile.TemporaryDirectory(prefix="qmscale-row-") as tmp:
        out, log = Path(tmp) / "row.json", Path(tmp) / "row.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--row", json.dumps(asdict(cfg))]
        argv += ["--row-out", str(out)]
        error = None
        with log.open("w") as err:
            try:
                rc = subprocess.run(argv, stderr=err, timeout=timeout, check=False).returncode
                if rc != 0:
                    error = f"row process exited {rc}"
            except subprocess.TimeoutExpired:
                error = f"row process killed after {timeout:.0f} s"
        row: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        if error:
            tail = log.read_text()[-1500:]
            row.setdefault("errors", []).append(f"{error}; its log ends: {tail}")
        return row


# (figure, where in a manager's figures, target: (comparison, limit) or None: shown only)
Target = tuple[str, float] | None
PER_MANAGER: list[tuple[str, tuple[str, ...], Target]] = [
    ("refresh round s", ("refresh", "refresh_round_s"), ("<=", REFRESH_INTERVAL_S)),
    ("refresh cpu s/round", ("refresh", "refresh_cpu_s"), None),
    ("refresh cpu fraction (cpu s / 15 s)", ("refresh", "cpu_fraction"), ("<", 1.0)),
    ("refresh queries/round", ("refresh", "refresh_queries"), None),
    ("reconcile round s", ("refresh", "reconcile", "wall_s"), None),
    ("reconcile cpu s", ("refresh", "reconcile", "cpu_s"), None),
    ("refresh period s (sleep 15 + both rounds)", ("refresh", "period_s"), None),
    ("DRS snapshot s", ("drs", "snapshot", "wall_s"), None),
    ("DRS round s", ("drs", "drs_round_s"), ("<=", DRS_TARGET_S)),
    ("DRS round queries", ("drs", "run", "queries"), None),
    ("GET /v1/vms?limit=100 p50 ms", ("api", "vms_p50_ms"), None),
    ("GET /v1/vms?limit=100 p95 ms", ("api", "vms_p95_ms"), ("<=", P95_TARGET_MS)),
    ("GET /v1/vms?limit=100 queries", ("api", "vms_queries"), None),
    ("GET /v1/tasks?limit=100 p95 ms", ("api", "tasks_p95_ms"), ("<=", P95_TARGET_MS)),
]


def dig(d: Any, path: tuple[str, ...]) -> float | None:
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return float(d) if isinstance(d, int | float) else None


def checks(row: dict[str, Any]) -> Iterator[tuple[str, str, float | None, Target]]:
    """(manager, figure, value, target) of one row."""
    for fig in row.get("per_manager", []):
        for name, path, target in PER_MANAGER:
            yield str(fig["manager"]), name, dig(fig, path), target
    mig = row.get("phases", {}).get("migrations") or {}
    n = float(mig.get("submitted", 0))
    wrong = ("lost", "doubled", "inventory_wrong", "copies_wrong")
    limit: Target = ("<=", DEFAULT_PER_HOST)
    for name, path, target in [
        ("migrations accepted (202)", ("accepted",), ("=", n)),
        ("migrations succeeded", ("states", "succeeded"), ("=", n)),
        ("migration submits/s", ("submits_per_s",), None),
        ("migrations wall s (first submit to last end)", ("wall_s",), None),
        ("manager cpu s per migration", ("cpu_per_migration_s",), None),
        *((f"migrations {k.replace('_', ' ')}", (k,), ("=", 0.0)) for k in wrong),
        *(
            (f"max migrations running on one host ({k})", (f"max_per_host_{v}",), limit)
            for k, v in (("tasks table", "tasks"), ("agents", "agents"), ("a runner", "slots"))
        ),
        ("GET /v1/vms p95 ms while migrating", ("vms_p95_under_load_ms",), None),
        ("queries/s while migrating", ("qps",), None),
    ]:
        yield "all", name, dig(mig, path), target
    size = dig(row, ("db_bytes",))
    yield "all", "database MB", None if size is None else size / 1e6, None
    yield (
        "all",
        "hosts registered through the API s",
        dig(row, ("phases", "populate", "hosts_s")),
        None,
    )


def verdict(value: float | None, target: Target) -> str:
    if target is None:
        return "—"
    op, limit = target
    ok = value is not None and {"<=": value <= limit, "<": value < limit, "=": value == limit}[op]
    return "PASS" if ok else "MISS"


def table(report: dict[str, Any]) -> str:
    lines = [
        "| backend | mgrs | hosts | VMs | mgr | figure | value | target | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        head = f"| {row['backend']} | {row['managers']} | {row['hosts']} | {row['vms']} |"
        if row.get("skipped"):
            lines.append(f"{head} | {row['skipped']} | | | |")
            continue
        for mgr, name, value, target in checks(row):
            shown = "n/a" if value is None else f"{value:.3g}" if value < 1000 else f"{value:.0f}"
            aim = "" if target is None else f"{target[0]} {target[1]:g}"
            lines.append(f"{head} {mgr} | {name} | {shown} | {aim} | {verdict(value, target)} |")
        for e in row.get("errors", []):
            lines.append(f"{head} | error | {e[:300]} | | MISS |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Cost against hosts (top), and per 1000 hosts (bottom: flat is linear growth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("refresh cpu s/round", 1), ("DRS round s", 8), ("GET /v1/vms?limit=100 p95 ms", 11)]
    fig, axes = plt.subplots(2, len(metrics), figsize=(14, 7), squeeze=False)
    lines: dict[str, list[tuple[int, list[float | None]]]] = {}
    for row in report["rows"]:
        if row.get("per_manager"):
            m0 = row["per_manager"][0]
            vals = [dig(m0, PER_MANAGER[k][1]) for _, k in metrics]
            label = f"{row['backend']}, {row['managers']} manager(s)"
            lines.setdefault(label, []).append((row["hosts"], vals))
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        for k, (name, _) in enumerate(metrics):
            xy = [(h, v[k]) for h, v in pts if v[k] is not None]
            xs, ys = [x for x, _ in xy], [cast(float, y) for _, y in xy]
            axes[0][k].plot(xs, ys, marker="o", label=label)
            axes[1][k].plot(xs, [y / x * 1000 for x, y in xy if y], marker="o", label=label)
            axes[0][k].set_title(name)
            axes[1][k].set_title(f"{name}, per 1000 hosts")
    for ax in axes.flat:
        ax.set_xlabel("hosts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"qmotion manager over simulated agents ({report['machine']['cpu']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = ap.add_argument
    add("--hosts", default="100,300,1000", help="host counts, one row each")
    add("--vms-per-host", type=int, default=20)
    add("--backend", default="sqlite", help="sqlite,postgresql")
    add("--managers", default="1", help="1,2 (two: PostgreSQL only)")
    add("--db-url", help="this database for its backend (its tables are dropped at each row)")
    add("--migrations", type=int, default=200)
    add("--rounds", type=int, default=3, help="refresh rounds per manager")
    add("--requests", type=int, default=50, help="of each API list measured")
    add("--agent-latency-ms", dest="latency_ms", type=float, default=1.0, help="per request")
    add("--executor-workers", type=int, help="the loop's default executor (default: asyncio's)")
    add("--phase-timeout", dest="phase_timeout_s", type=float, default=600.0)
    add("--migration-timeout", dest="migration_timeout_s", type=float, default=600.0)
    add("--row-timeout", type=float, default=3600.0)
    add("--lifespan", action="store_true", help="start the apps' lifespan (their loops) too")
    add("--quick", action="store_true", help="fewer rounds and requests, shorter time limits")
    add("--out", type=Path, default=Path("bench/results/scale.json"))
    add("--plot", type=Path, help="a PNG of cost against hosts")
    add("--row", help=argparse.SUPPRESS)
    add("--row-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.row:
        loop = asyncio.new_event_loop()
        cfg = RowConfig(**json.loads(a.row))
        if cfg.executor_workers:
            loop.set_default_executor(ThreadPoolExecutor(cfg.executor_workers))
        loop.run_until_complete(run_row(cfg, a.row_out))
        sys.stderr.flush()
        os._exit(0)  # not waiting for the worker threads a timed-out phase left behind
    if a.quick:
        a.rounds, a.requests = min(a.rounds, 2), min(a.requests, 20)
        a.phase_timeout_s = min(a.phase_timeout_s, 60.0)
        a.migration_timeout_s = min(a.migration_timeout_s, 120.0)
        a.row_timeout = min(a.row_timeout, 600.0)
    if min(ints(a.hosts), default=0) < 2 or not ints(a.managers):
        ap.error("--hosts: 2 or more hosts per row (a migration needs two); --managers: 1,2")
    backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    if unknown := set(backends) - {"sqlite", "postgresql"}:
        ap.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    fixed = ("backend", "managers", "hosts", "db_url")
    common = {f.name: getattr(a, f.name) for f in fields(RowConfig) if f.name not in fixed}
    report: dict[str, Any] = {"machine": machine(), "args": dict(vars(a))}
    report["rows"] = []
    with contextlib.ExitStack() as stack:
        for backend in backends:
            given = a.db_url if a.db_url and a.db_url.startswith(backend) else None
            url = postgres_url(stack, given) if backend == "postgresql" else given
            for managers, hosts in itertools.product(ints(a.managers), ints(a.hosts)):
                cfg = RowConfig(backend, managers, hosts, db_url=url, **common)
                row = asdict(cfg) | {"vms": hosts * a.vms_per_host, "db_url": None}
                if managers > 1 and backend == "sqlite":
                    row["skipped"] = "skipped: a second replica matters on PostgreSQL only"
                else:
                    print(f"scale: {backend} {managers} {hosts}", file=sys.stderr, flush=True)
                    row |= run_child(cfg, a.row_timeout)
                report["rows"].append(row)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table(report))
    if a.plot:
        plot(report, a.plot)


def ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x.strip()]


if __name__ == "__main__":
    main()
