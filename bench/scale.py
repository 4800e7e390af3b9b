"""Scale, measured: the real manager against N simulated host agents, in-process, per backend.

    python bench/scale.py --hosts 100,300,1000 --vms-per-host 20 --backend sqlite,postgresql \
        --managers 1,2 --out bench/results/scale.json [--plot docs/scale.png] [--quick]

Each row (backend, managers, hosts) runs in its own child process (killed at ``--row-timeout``;
every phase inside it has its own timeout, and the row's figures are written after each
phase, so a row cut short still reports what it measured). In it: ``create_app`` (one per
manager, all on the row's fresh database, each its own ``replica`` name) with
``AgentConnector(transport=SimCluster.transport)`` (bench/sim_agents.py: each agent request
waits ``--agent-latency-ms``, and calls that block a real agent block as long). The bench
drives the app's own services (``app.state``: inventory, drs, reconciler, runner), so what
it measures is what the manager runs. The lifespan is not started (``--lifespan`` starts
it): its refresh and DRS loops would land in the measurements; each runner only joins as a
replica (``recover_after_restart``) and keeps its lease. What the lifespan would set, the
bench sets itself: the loop's default executor, ``WORKER_THREADS`` (64) threads as the
manager's (``--executor-workers`` to try another size). The phases, each manager on its
own in turn:

- populate: hosts registered through the API (``POST /v1/hosts``, which asks each agent its
  facts); VMs inserted as rows (``qmotion.server.db.Vm``) in one bulk insert, and the same VMs
  given to the simulated agents so reconcile finds nothing to fix. Through the API a VM costs
  O(VMs) (``committed``, ``_allocate_mac`` read every VM): 20 000 of them would take hours.
- refresh: ``inventory.refresh_hosts`` as ``_refresh_forever`` calls it (hosts read by its
  own pool of threads; DRS's grace, metrics into the app's ``ClusterDrs`` demand window),
  ``--rounds`` times; then one ``reconciler.run`` round. CPU is the manager's process time
  less what the simulated agents spent (sim_agents counts it per thread); target: the round
  within the 15 s interval, under 1 core (cpu_s / 15).
- DRS: the app's ``drs.snapshot(cooldown=True)`` alone, then ``drs.run`` (snapshot, plan,
  recommendations stored), on the measured demand; target 10 s.
- migrations: ``--migrations`` live migrations of distinct VMs, targets spread evenly,
  submitted at once through ``POST /v1/vms/{vm}/migrate`` (round robin over the managers) and
  waited for. Every 50 ms a sampler thread reads the running tasks per host (the tasks table:
  the cluster's count, whatever replica runs them); the agents count the migrations touching
  each host (every one, from the destination's preparation to its end). Checked: every
  accepted task ended (none lost), one task per VM (none doubled), at most 4 per host at
  once (both counts), the inventory names each moved VM's new host, one running copy of each
  VM at the end.
- API: ``GET /v1/vms?limit=100`` (cursors spread over the list) and ``GET /v1/tasks?limit=100``,
  ~50 each, through ``httpx.ASGITransport`` (in-process: no socket, no uvicorn; the route's
  thread pool and middleware are the app's); target p95 100 ms. Also the VM list sampled
  every 0.5 s while the migrations ran.
- database size (SQLite: file and WAL; PostgreSQL: ``pg_database_size``) and the queries each
  phase issued (``before_cursor_execute`` on each manager's engine), per second of the phase.

Two managers share the CPU of one process here: their phases run one after the other (each
as if it had the machine), except the migrations, split across both at once. PostgreSQL (a
throwaway cluster, see ``database``; its server's CPU is not in the manager's figures) or
``--db-url``: a database of its backend (by scheme), its qmotion tables dropped at each
row. The report (targets, PASS/MISS, the table, the plot): bench/scale_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

if __package__ in (None, ""):  # run as a file (python bench/scale.py): the repository's root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from fastapi import FastAPI
from sqlalchemy import create_engine, event, insert, select

from bench import scale_report
from bench.scale_db import database, db_bytes, reset
from bench.sim_agents import SimCluster, agent_url
from qmotion.server.agents import AgentConnector
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.db import Host, Task, TaskEvent, Vm, utcnow
from qmotion.server.http.app import REFRESH_INTERVAL_S, WORKER_THREADS, create_app
from qmotion.server.inventory import Inventory
from qmotion.server.reconciler import Reconciler
from qmotion.server.tasks.runner import TaskRunner

T = TypeVar("T")
TOKEN = "scale-bench-manager-token-0123"
AGENT_TOKEN = "scale-bench-agent-token-0123"
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
    executor_workers: int
    phase_timeout_s: float
    migration_timeout_s: float
    lifespan: bool


@dataclass
class Manager:
    """One manager: its app and the app's own services the bench drives."""

    app: FastAPI
    runner: TaskRunner
    inventory: Inventory
    drs: ClusterDrs
    reconciler: Reconciler
    client: httpx.AsyncClient
    queries: list[int] = field(default_factory=lambda: [0])


def build_manager(url: str, sim: SimCluster, index: int) -> Manager:
    # Replicas on one database need names of their own.
    agents = AgentConnector(transport=sim.transport)
    app = create_app(url, TOKEN, agents=agents, replica=f"bench-{index}")
    state = app.state
    m = Manager(
        app,
        cast(TaskRunner, state.runner),
        cast(Inventory, state.inventory),
        cast(ClusterDrs, state.drs),
        cast(Reconciler, state.reconciler),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://manager",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120.0,
        ),
    )

    def count(*_: Any) -> None:
        m.queries[0] += 1

    event.listen(m.inventory.db.engine, "before_cursor_execute", count)
    return m


# ---------------------------------------------------------------------------- measuring


def measured(sim: SimCluster, m: Manager, fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``fn`` in this thread: its wall time, the manager's CPU (process time, in every
    thread: a refresh reads its hosts in a pool of its own; less the simulated agents'
    own), and its queries."""
    q0, sim0 = m.queries[0], sim.sim_cpu()
    w0, p0 = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - w0
    sim_all = sim.sim_cpu() - sim0
    return out, {
        "wall_s": round(wall, 4),
        "cpu_s": round(time.process_time() - p0 - sim_all, 4),
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
        with m.inventory.db.session() as s:
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

    def one() -> None:  # as _refresh_forever calls it: metrics into the app's DRS window
        m.inventory.refresh_hosts(grace, lambda _h, x: m.drs.sample(x))

    for _ in range(cfg.rounds):
        r0 = sum(sim.requests.values())
        _, fig = await asyncio.to_thread(measured, sim, m, one)
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
    the tasks table (its own engine: not in the managers' query counts; off the loop). No
    runner's own slots are read: the tasks table is the cluster's count, and the agents
    count every migration touching their host exactly (SimCluster.max_concurrent)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.active, self.max_tasks, self.samples = -1, 0, 0

    def run(self) -> None:
        engine = create_engine(self.url)
        live = select(Task.state, Task.source, Task.destination).where(
            Task.kind == "migrate", Task.state.in_(("queued", "running"))
        )
        while not self.stop.wait(0.05):
            with engine.connect() as c:
                rows = c.execute(live).all()
            per = Counter(h for r in rows if r.state == "running" for h in (r[1], r[2]) if h)
            self.max_tasks = max(self.max_tasks, *per.values(), 0)
            self.active, self.samples = len(rows), self.samples + 1
        engine.dispose()


async def migrations(
    cfg: RowConfig, url: str, sim: SimCluster, ms: list[Manager], row: dict[str, Any]
) -> dict[str, Any]:
    moves = plan_moves(cfg)
    out: dict[str, Any] = {"submitted": len(moves)}
    row["phases"]["migrations"] = out
    sampler = Sampler(url)
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
        rows = c.execute(
            select(Task.id, Task.vm, Task.state, Task.destination, Task.error, Task.owner)
        ).all()
        where = {vm: host for vm, host in c.execute(select(Vm.name, Host.name).join(Host))}
        # What the tasks that did not end say last: why a move is still under way.
        stuck = [r.id for r in rows if r.state not in FINAL][:3]
        last_events = {
            f"task {tid} ({next(r.owner for r in rows if r.id == tid)})": [
                e
                for (e,) in c.execute(
                    select(TaskEvent.message)
                    .where(TaskEvent.task_id == tid)
                    .order_by(TaskEvent.id.desc())
                    .limit(4)
                )
            ]
            for tid in stuck
        }
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
        "unfinished_last_events": last_events,
    }
    return out


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
                stack.callback(asyncio.ensure_future(m.runner.keep_leases()).cancel)
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
            moved = migrations(cfg, url, sim, ms, row)
            await bounded(row, "migrations", cfg.migration_timeout_s + budget, moved)
            save()
            for i, m in enumerate(ms):
                got = await bounded(row, f"api[{i}]", budget, api_latency(cfg, m, names))
                row["per_manager"][i]["api"] = got
                save()
            row["db_bytes"] = db_bytes(url)
            row["agent_requests"] = dict(sim.requests.most_common())
            save()


# ---------------------------------------------------------------------------- the run


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
        if keep := os.environ.get("QMOTION_SCALE_LOGS"):  # a row's log kept, for a look
            shutil.copy(log, Path(keep) / f"{cfg.backend}-{cfg.managers}-{cfg.hosts}.log")
        row: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        if error:
            tail = log.read_text()[-1500:]
            row.setdefault("errors", []).append(f"{error}; its log ends: {tail}")
        return row


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
    add("--executor-workers", type=int, default=WORKER_THREADS, help="the loop's default pool")
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
        # The manager's warnings and errors (a lease lost, a task taken over) in the row's log.
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        loop = asyncio.new_event_loop()
        cfg = RowConfig(**json.loads(a.row))
        # What the lifespan sets (it sets its own again with --lifespan): agent and database
        # calls, a migration's polls among them, run in these threads.
        pool = ThreadPoolExecutor(cfg.executor_workers, thread_name_prefix="manager")
        loop.set_default_executor(pool)
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
    report: dict[str, Any] = {"machine": scale_report.machine(), "args": dict(vars(a))}
    report["rows"] = []
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the finally blocks (PostgreSQL's) run
        signal.signal(sig, stopped)
    for backend in backends:
        given = a.db_url if a.db_url and a.db_url.startswith(backend) else None
        with database(backend, given) as url:
            for managers, hosts in itertools.product(ints(a.managers), ints(a.hosts)):
                cfg = RowConfig(backend, managers, hosts, db_url=url, **common)
                row = asdict(cfg) | {"vms": hosts * a.vms_per_host, "db_url": None}
                if managers > 1 and backend == "sqlite":
                    row["skipped"] = "skipped: a second replica matters on PostgreSQL only"
                else:
                    print(f"scale: {backend} {managers} {hosts}", file=sys.stderr, flush=True)
                    row |= run_child(cfg, a.row_timeout)
                    row["score"] = scale_report.score(row)
                report["rows"].append(row)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = scale_report.table(report)
    a.out.with_suffix(".md").write_text(md + "\n")  # quoted in docs/benchmarks.md
    print(md)
    if a.plot:
        scale_report.plot(report, a.plot)


def stopped(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x.strip()]


if __name__ == "__main__":
    main()
