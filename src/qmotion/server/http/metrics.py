"""The manager's Prometheus metrics (``GET /metrics``), read from the database at each scrape.

Nothing is counted in memory: the counters are sums over the task table, so they survive a
manager restart and agree with ``GET /v1/tasks`` (they fall back only if tasks are deleted
from the database by hand). Figures:

- ``qmotion_migrations_total{kind,state}``: ended migrations (live ``migrate``, which includes
  shared-nothing, ``cold-migrate``, ``storage-move``) by final state; every pair is present,
  zero until one ends so, so that ``rate()`` sees the first;
- ``qmotion_migration_duration_seconds{kind}``: succeeded migrations, task started -> ended;
- ``qmotion_migration_downtime_seconds``: succeeded live migrations, QEMU's downtime;
- ``qmotion_migration_sent_bytes_total{stream}``: what live migrations sent, ``ram`` (QEMU's
  stream) and ``disk`` (a shared-nothing migration's disk copy), whatever their outcome;
- ``qmotion_tasks_active{state}``: the task queue: tasks queued and running, of every kind;
- ``qmotion_vms{state}`` and ``qmotion_vms_attention``: the inventory's VMs;
- ``qmotion_host_state{host,state}`` (1 for the host's state, 0 for the others),
  ``qmotion_host_degraded{host}``, ``qmotion_host_last_seen_timestamp_seconds{host}`` and
  ``qmotion_host_vms{host}``;
- ``qmotion_drs_imbalance`` and ``qmotion_drs_broken_must_rules``: DRS's live measure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, get_args

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from qmotion.api.server import HostOut, TaskState
from qmotion.api.service import COMMON_ERROR_STATUSES, json_error_responses
from qmotion.api.vm import VmState
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Task, Vm
from qmotion.server.inventory import Inventory
from qmotion.server.tasks.task_view import COLD_MIGRATE, MIGRATE, STORAGE_MOVE

log = logging.getLogger(__name__)
MIGRATION_KINDS = (MIGRATE, COLD_MIGRATE, STORAGE_MOVE)
ENDED_STATES = tuple(s.value for s in TaskState if not s.active)
HOST_STATES: tuple[str, ...] = get_args(HostOut.model_fields["state"].annotation)
# Seconds. A live migration takes seconds to minutes (a shared-nothing one, with its disks,
# up to an hour); its downtime, milliseconds to a second when it goes well.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def histogram(
    family: HistogramMetricFamily,
    labels: Sequence[str],
    values: Sequence[float],
    bounds: Sequence[float],
) -> None:
    """``values`` into ``family`` as cumulative buckets (``le``) under ``labels``."""
    buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in bounds]
    buckets.append(("+Inf", float(len(values))))
    family.add_metric(list(labels), buckets, sum_value=float(sum(values)))


class ManagerCollector(Collector):
    """Every figure, from the database (and DRS's demand window) at the time of the scrape."""

    def __init__(self, db: Database, inventory: Inventory, drs: ClusterDrs) -> None:
        self.db, self.inventory, self.drs = db, inventory, drs

    def collect(self) -> Iterable[Metric]:
        yield from self._migrations()
        yield from self._tasks_and_vms()
        yield from self._hosts()
        yield from self._drs()

    def _migrations(self) -> Iterator[Metric]:
        ended = CounterMetricFamily(
            "qmotion_migrations",
            "Migrations ended, by kind and final state",
            labels=["kind", "state"],
        )
        durations = HistogramMetricFamily(
            "qmotion_migration_duration_seconds",
            "Succeeded migrations: task started to ended",
            labels=["kind"],
        )
        downtime = HistogramMetricFamily(
            "qmotion_migration_downtime_seconds",
            "Succeeded live migrations: QEMU's downtime (source stopped to resumed)",
            labels=[],
        )
        sent = CounterMetricFamily(
            "qmotion_migration_sent_bytes",
            "Bytes live migrations sent: ram (QEMU's stream), disk (shared-nothing disk copy)",
            labels=["stream"],
        )
        with self.db.session() as s:
            counts = dict.fromkeys(((k, st) for k in MIGRATION_KINDS for st in ENDED_STATES), 0)
            rows = s.execute(
                select(Task.kind, Task.state, func.count())
                .where(Task.kind.in_(MIGRATION_KINDS), Task.state.in_(ENDED_STATES))
                .group_by(Task.kind, Task.state)
            )
            for kind, state, n in rows:
                counts[(kind, state)] = n
            succeeded = s.execute(
                select(Task.kind, Task.started_at, Task.ended_at).where(
                    Task.kind.in_(MIGRATION_KINDS), Task.state == TaskState.SUCCEEDED
                )
            ).all()
            downtimes_ms = s.scalars(
                select(Task.result["downtime_ms"].as_float()).where(
                    Task.kind == MIGRATE, Task.state == TaskState.SUCCEEDED
                )
            ).all()
            ram, disk = s.execute(
                select(
                    func.sum(Task.result["bytes"].as_integer()),
                    func.sum(Task.result["disk_bytes"].as_integer()),
                ).where(Task.kind == MIGRATE, Task.state.in_(ENDED_STATES))
            ).one()
        for (kind, state), n in counts.items():
            ended.add_metric([kind, state], n)
        for kind in MIGRATION_KINDS:
            seconds = [
                (end - start).total_seconds()
                for k, start, end in succeeded
                if k == kind and start is not None and end is not None
            ]
            histogram(durations, [kind], seconds, DURATION_BUCKETS)
        histogram(
            downtime, [], [ms / 1000 for ms in downtimes_ms if ms is not None], DOWNTIME_BUCKETS
        )
        sent.add_metric(["ram"], ram or 0)
        sent.add_metric(["disk"], disk or 0)
        yield from (ended, durations, downtime, sent)

    def _tasks_and_vms(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "qmotion_tasks_active", "Tasks of every kind queued or running", labels=["state"]
        )
        vms = GaugeMetricFamily("qmotion_vms", "VMs in the inventory, by state", labels=["state"])
        with self.db.session() as s:
            tasks = dict.fromkeys(ACTIVE_TASK_STATES, 0)
            active_rows = s.execute(
                select(Task.state, func.count())
                .where(Task.state.in_(ACTIVE_TASK_STATES))
                .group_by(Task.state)
            )
            tasks.update((state, n) for state, n in active_rows)
            by_state = {st.value: 0 for st in VmState}
            vm_rows = s.execute(select(Vm.state, func.count()).group_by(Vm.state))
            by_state.update((state, n) for state, n in vm_rows)
            attention = s.scalar(select(func.count()).where(Vm.attention.is_not(None)))
        for state, n in tasks.items():
            active.add_metric([state], n)
        for state, n in by_state.items():
            vms.add_metric([state], n)
        yield active
        yield vms
        yield GaugeMetricFamily(
            "qmotion_vms_attention", "VMs that need an operator (vm resolve)", value=attention or 0
        )

    def _hosts(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "qmotion_host_state",
            "1 for the host's state, 0 for the others",
            labels=["host", "state"],
        )
        degraded = GaugeMetricFamily(
            "qmotion_host_degraded",
            "1: the host's agent reports something VMs rely on failing",
            labels=["host"],
        )
        seen = GaugeMetricFamily(
            "qmotion_host_last_seen_timestamp_seconds",
            "When the manager last heard from the host's agent",
            labels=["host"],
        )
        vms = GaugeMetricFamily(
            "qmotion_host_vms", "VMs the inventory places on the host", labels=["host"]
        )
        for h in self.inventory.list_hosts():
            for st in HOST_STATES:
                state.add_metric([h.name, st], 1 if h.state == st else 0)
            degraded.add_metric([h.name], 1 if h.facts and h.facts.health == "degraded" else 0)
            if h.last_seen is not None:
                seen.add_metric([h.name], h.last_seen.timestamp())
            vms.add_metric([h.name], len(h.vms))
        yield from (state, degraded, seen, vms)

    def _drs(self) -> Iterator[Metric]:
        try:
            drs = self.drs.state()
        except Exception:  # a scrape must not fail with DRS: the other figures still count
            log.exception("DRS state not measured for /metrics")
            return
        yield GaugeMetricFamily(
            "qmotion_drs_imbalance",
            "RMS of the spreads of hosts' normalised CPU and memory (DRS's measure)",
            value=drs.imbalance,
        )
        yield GaugeMetricFamily(
            "qmotion_drs_broken_must_rules",
            "VMs placed against a must rule",
            value=drs.broken_must_rules,
        )


def install_metrics(
    app: FastAPI, db: Database, inventory: Inventory, drs: ClusterDrs, auth: list[Any]
) -> None:
    """``GET /metrics``: the Prometheus text format, behind the API's own auth (read-only)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ManagerCollector(db, inventory, drs))

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=auth,
        responses=json_error_responses(*COMMON_ERROR_STATUSES),
        summary="Prometheus metrics: migrations, tasks, VMs, hosts, DRS (text format 0.0.4)",
    )
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
