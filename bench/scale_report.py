"""The scale bench's report: its targets, PASS/MISS per figure, the table, the plot, the machine.

``bench/scale.py`` measures and writes each row's figures; this module reads them back by
path (``PER_MANAGER``, ``checks``), scores each against its target and shows them: the
Markdown table (stdout), the scored figures in the JSON (``score``) and a PNG of cost
against hosts. Cluster-wide costs are shown divided by the row's hosts too: the same value
down a figure's rows is linear growth.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qmotion.client.agent import AgentClient
from qmotion.server.http.app import REFRESH_INTERVAL_S, WORKER_THREADS
from qmotion.server.tasks.runner import DEFAULT_PER_HOST

DRS_TARGET_S, P95_TARGET_MS = 10.0, 100.0
AGENTS = "simulated (in-process), no VMs"

# A target: (comparison, limit); None: the figure is shown only.
Target = tuple[str, float] | None


@dataclass(frozen=True)
class Figure:
    name: str
    path: tuple[str, ...]  # where in a manager's (or the migrations') figures
    target: Target = None
    per_host: bool = False  # a cost over the whole cluster: shown divided by hosts too


@dataclass(frozen=True)
class Check:
    manager: str  # its index, or "all"
    figure: Figure
    value: float | None
    per_host: float | None

    @property
    def result(self) -> str:
        return verdict(self.value, self.figure.target)


PER_MANAGER = [
    Figure("refresh round s", ("refresh", "refresh_round_s"), ("<=", REFRESH_INTERVAL_S), True),
    Figure("refresh cpu s/round", ("refresh", "refresh_cpu_s"), None, True),
    Figure("refresh cpu fraction (cpu s / 15 s)", ("refresh", "cpu_fraction"), ("<", 1.0), True),
    Figure("refresh queries/round", ("refresh", "refresh_queries"), None, True),
    Figure("reconcile round s", ("refresh", "reconcile", "wall_s"), None, True),
    Figure("reconcile cpu s", ("refresh", "reconcile", "cpu_s"), None, True),
    Figure("refresh period s (sleep 15 + both rounds)", ("refresh", "period_s")),
    Figure("DRS snapshot s", ("drs", "snapshot", "wall_s"), None, True),
    Figure("DRS round s", ("drs", "drs_round_s"), ("<=", DRS_TARGET_S), True),
    Figure("DRS round cpu s", ("drs", "run", "cpu_s"), None, True),
    Figure("DRS round queries", ("drs", "run", "queries"), None, True),
    Figure("GET /v1/vms?limit=100 p50 ms", ("api", "vms_p50_ms")),
    Figure("GET /v1/vms?limit=100 p95 ms", ("api", "vms_p95_ms"), ("<=", P95_TARGET_MS)),
    Figure("GET /v1/vms?limit=100 queries", ("api", "vms_queries")),
    Figure("GET /v1/tasks?limit=100 p95 ms", ("api", "tasks_p95_ms"), ("<=", P95_TARGET_MS)),
]
# What the plot shows (names of PER_MANAGER figures).
PLOTTED = ("refresh cpu s/round", "DRS round s", "GET /v1/vms?limit=100 p95 ms")
DB_MB = Figure("database MB", ("db_bytes",), None, True)
REGISTER = Figure(
    "hosts registered through the API s", ("phases", "populate", "hosts_s"), None, True
)
WRONG = ("lost", "doubled", "inventory_wrong", "copies_wrong")


def migration_figures(submitted: float) -> list[Figure]:
    """The migrations phase's figures (one set for the row, whichever managers ran them)."""
    limit: Target = ("<=", DEFAULT_PER_HOST)
    return [
        Figure("migrations accepted (202)", ("accepted",), ("=", submitted)),
        Figure("migrations succeeded", ("states", "succeeded"), ("=", submitted)),
        Figure("migration submits/s", ("submits_per_s",)),
        Figure("migrations wall s (first submit to last end)", ("wall_s",)),
        Figure("manager cpu s per migration", ("cpu_per_migration_s",)),
        *(Figure(f"migrations {k.replace('_', ' ')}", (k,), ("=", 0.0)) for k in WRONG),
        Figure("max migrations on one host (tasks table)", ("max_per_host_tasks",), limit),
        Figure("max migrations on one host (agents)", ("max_per_host_agents",), limit),
        Figure("GET /v1/vms p95 ms while migrating", ("vms_p95_under_load_ms",)),
        Figure("queries/s while migrating", ("qps",)),
    ]


def dig(d: Any, path: tuple[str, ...]) -> float | None:
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return float(d) if isinstance(d, int | float) else None


def checks(row: dict[str, Any]) -> Iterator[Check]:
    """Every figure of one row, with its value (None: not measured) and per host."""
    hosts = max(int(row.get("hosts") or 1), 1)

    def check(manager: str, fig: Figure, value: float | None) -> Check:
        per = None if value is None or not fig.per_host else value / hosts
        return Check(manager, fig, value, per)

    for got in row.get("per_manager", []):
        for fig in PER_MANAGER:
            yield check(str(got["manager"]), fig, dig(got, fig.path))
    mig = row.get("phases", {}).get("migrations") or {}
    for fig in migration_figures(float(mig.get("submitted", 0))):
        yield check("all", fig, dig(mig, fig.path))
    size = dig(row, ("db_bytes",))
    yield check("all", DB_MB, None if size is None else size / 1e6)
    yield check("all", REGISTER, dig(row, REGISTER.path))


def verdict(value: float | None, target: Target) -> str:
    if target is None:
        return "—"
    op, limit = target
    ok = value is not None and {"<=": value <= limit, "<": value < limit, "=": value == limit}[op]
    return "PASS" if ok else "MISS"


def score(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's figures as the JSON keeps them: each next to its target and verdict."""
    return [
        {
            "manager": c.manager,
            "figure": c.figure.name,
            "value": c.value,
            "per_host": c.per_host,
            "target": None if c.figure.target is None else " ".join(map(str, c.figure.target)),
            "result": c.result,
        }
        for c in checks(row)
    ]


def machine() -> dict[str, Any]:
    """Where the bench ran, and what the simulated agents leave out of the manager's cost."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    # The manager builds an AgentClient per agent call (a refresh round: one per host); on
    # the network it makes a connection pool too, which the in-process transport skips.
    t0 = time.process_time()
    for _ in range(20):
        AgentClient("http://agent.invalid:7100", "token").close()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).date().isoformat(),
        "agents": AGENTS,
        "default_executor_workers": WORKER_THREADS,
        "agent_client_cpu_ms": round((time.process_time() - t0) / 20 * 1000, 3),
    }


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table(report: dict[str, Any]) -> str:
    """Markdown: the machine first; then per backend and managers, each figure's rows one
    under the other by hosts, so its growth reads down the ``per host`` column."""
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {m['date']}. "
        f"Agents: {m['agents']}. The manager's default executor: "
        f"{m['default_executor_workers']} threads.",
        "",
        "| backend | mgrs | hosts | VMs | mgr | figure | value | per host | target | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in report["rows"]:
        groups.setdefault((row["backend"], row["managers"]), []).append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: int(r["hosts"]))
        by_figure: dict[tuple[str, str], list[tuple[dict[str, Any], Check]]] = {}
        for row in rows:
            for c in checks(row) if not row.get("skipped") else ():
                by_figure.setdefault((c.manager, c.figure.name), []).append((row, c))
        for found in by_figure.values():
            for row, c in found:
                t = c.figure.target
                aim = "" if t is None else f"{t[0]} {t[1]:g}"
                per = "" if c.per_host is None else f"{c.per_host:.3g}"
                lines.append(
                    f"{head(row)} {c.manager} | {c.figure.name} | {shown(c.value)} | {per} "
                    f"| {aim} | {c.result} |"
                )
        for row in rows:
            if row.get("skipped"):
                lines.append(f"{head(row)} | {row['skipped']} | | | | |")
            for e in row.get("errors", []):
                lines.append(f"{head(row)} | error | {e[:300]} | | | MISS |".replace("\n", " "))
    lines += [
        "",
        "per host: the figure divided by the row's hosts (cluster-wide costs only): the same "
        "value down a figure's rows is linear growth, a rising one faster. Per-request and "
        "per-migration figures have none: flat as they are is what scales.",
    ]
    return "\n".join(lines) + "\n"


def head(row: dict[str, Any]) -> str:
    return f"| {row['backend']} | {row['managers']} | {row['hosts']} | {row['vms']} |"


def plot(report: dict[str, Any], path: Path) -> None:
    """Cost against hosts (top), and per 1000 hosts (bottom: flat is linear growth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [next(f for f in PER_MANAGER if f.name == name) for name in PLOTTED]
    fig, axes = plt.subplots(2, len(figures), figsize=(14, 7), squeeze=False)
    lines: dict[str, list[tuple[int, list[float | None]]]] = {}
    for row in report["rows"]:
        if row.get("per_manager"):
            m0 = row["per_manager"][0]
            label = f"{row['backend']}, {row['managers']} manager(s)"
            lines.setdefault(label, []).append((row["hosts"], [dig(m0, f.path) for f in figures]))
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        for k, f in enumerate(figures):
            xy = [(h, y) for h, v in pts if (y := v[k]) is not None]
            axes[0][k].plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
            per = [(x, y / x * 1000) for x, y in xy]
            axes[1][k].plot([x for x, _ in per], [y for _, y in per], marker="o", label=label)
            axes[0][k].set_title(f.name)
            axes[1][k].set_title(f"{f.name}, per 1000 hosts")
    for ax in axes.flat:
        ax.set_xlabel("hosts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"qmotion manager, agents {m['agents']} ({m['cpu']}, {m['cores']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
