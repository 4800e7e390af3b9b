"""The agent's Prometheus metrics (``GET /metrics``): VMs, host CPU and memory, migrations.

Built from what the agent holds at the time of the scrape.

Figures (every one a gauge):

- ``qmotion_agent_vms{state}``: the VMs defined on this host, by state (every state present);
- ``qmotion_agent_host_cpus``, ``qmotion_agent_host_cpu_busy_ratio`` (0..1, the whole host),
  ``qmotion_agent_host_memory_total_bytes``, ``qmotion_agent_host_memory_available_bytes``,
  ``qmotion_agent_vms_memory_bytes`` (the running VMs' configured memory) and
  ``qmotion_agent_metrics_sampled_timestamp_seconds`` (when they were sampled: every 2 s);
- per running VM: ``qmotion_agent_vm_cpus_busy{vm}`` (1 = one CPU), ``qmotion_agent_vm_rss_bytes``
  and, once measured, ``qmotion_agent_vm_dirty_rate_bytes_per_second``;
- ``qmotion_agent_migrations_in_progress{direction}``: ``outgoing`` (a live migration of a VM of
  this host not finished) and ``incoming`` (a stream arriving, not yet resumed here).

The process's own figures (Python's collectors) are left out: every agent would otherwise
report them under the same names as the manager's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qmotion.api.host import HostMetrics
from qmotion.api.vm import VmState

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MIB = 1 << 20


class _Figures(Collector):
    """Families built for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def families(
    host: HostMetrics, vm_states: Iterable[VmState], outgoing: int, incoming: int
) -> list[Metric]:
    states = Counter(vm_states)
    vms = GaugeMetricFamily("qmotion_agent_vms", "VMs defined on this host", labels=["state"])
    for st in VmState:
        vms.add_metric([st.value], states[st])
    busy = GaugeMetricFamily(
        "qmotion_agent_vm_cpus_busy", "A running VM's CPU use (1 = one CPU)", labels=["vm"]
    )
    rss = GaugeMetricFamily(
        "qmotion_agent_vm_rss_bytes", "A running VM's resident memory", labels=["vm"]
    )
    dirty = GaugeMetricFamily(
        "qmotion_agent_vm_dirty_rate_bytes_per_second",
        "A running VM's guest dirty rate, as last measured (every 60 s)",
        labels=["vm"],
    )
    for vm in host.vms:
        busy.add_metric([vm.name], vm.cpu_percent / 100)
        rss.add_metric([vm.name], vm.rss_bytes)
        if vm.dirty_rate_mib_s is not None:
            dirty.add_metric([vm.name], vm.dirty_rate_mib_s * MIB)
    migrations = GaugeMetricFamily(
        "qmotion_agent_migrations_in_progress",
        "Live migrations under way: outgoing (from this host), incoming (to it)",
        labels=["direction"],
    )
    migrations.add_metric(["outgoing"], outgoing)
    migrations.add_metric(["incoming"], incoming)
    return [
        vms,
        _gauge("qmotion_agent_host_cpus", "CPUs this host offers VMs", host.cpus),
        _gauge(
            "qmotion_agent_host_cpu_busy_ratio",
            "The whole host's CPU use (1 = every CPU busy)",
            host.cpu_percent / 100,
        ),
        _gauge(
            "qmotion_agent_host_memory_total_bytes", "The host's memory", host.memory_total_bytes
        ),
        _gauge(
            "qmotion_agent_host_memory_available_bytes",
            "The host's memory available (MemAvailable)",
            host.memory_available_bytes,
        ),
        _gauge(
            "qmotion_agent_vms_memory_bytes",
            "Memory of the running VMs, as configured",
            host.vms_memory_mib * MIB,
        ),
        _gauge(
            "qmotion_agent_metrics_sampled_timestamp_seconds",
            "When the host's and the VMs' figures were sampled",
            host.sampled_at.timestamp(),
        ),
        busy,
        rss,
        dirty,
        migrations,
    ]


def exposition(
    host: HostMetrics, vm_states: Iterable[VmState], outgoing: int, incoming: int
) -> bytes:
    """The Prometheus text format (0.0.4) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(families(host, vm_states, outgoing, incoming)))
    return generate_latest(registry)
