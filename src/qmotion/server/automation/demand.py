"""Measured demand: the agents' per-VM CPU, memory and dirty-rate samples over a sliding window.

DRS plans on the window's means instead of what each VM was given (its vCPUs and memory).
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime, timedelta

from qmotion.api.host import HostMetrics

WINDOW_S = 300.0  # measured demand: the mean over this sliding window


class DemandWindow:
    """Per-VM CPU (cores) and memory (MiB) samples from the agents, over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window = timedelta(seconds=window_s)
        self.samples: dict[str, deque[tuple[datetime, float, float]]] = {}
        # The agents measure dirty rates now and then: the latest one per VM.
        self.dirty: dict[str, tuple[datetime, float]] = {}
        # Refresh threads add while planning threads read.
        self._lock = threading.Lock()

    def add(self, metrics: HostMetrics) -> None:
        with self._lock:
            for v in metrics.vms:
                q = self.samples.setdefault(v.name, deque())
                q.append((metrics.sampled_at, v.cpu_percent / 100.0, v.rss_bytes / (1 << 20)))
                if v.dirty_rate_mib_s is not None:
                    self.dirty[v.name] = (metrics.sampled_at, v.dirty_rate_mib_s)
                # Only this host's VMs here: a refresh round adds every host's metrics, and
                # pruning the whole cluster's on each would cost hosts x VMs per round.
                while q and metrics.sampled_at - q[0][0] > self.window:
                    q.popleft()

    def _prune(self, now: datetime) -> None:
        for vm, q in list(self.samples.items()):
            while q and now - q[0][0] > self.window:
                q.popleft()
            if not q:
                del self.samples[vm]
        for vm, (at, _) in list(self.dirty.items()):
            if now - at > self.window:
                del self.dirty[vm]

    def dirty_rates(self, now: datetime) -> dict[str, float]:
        with self._lock:
            self._prune(now)
            return {vm: rate for vm, (_, rate) in self.dirty.items()}

    def demand(self, now: datetime) -> dict[str, tuple[float, float]]:
        with self._lock:
            self._prune(now)
            return {
                vm: (sum(x[1] for x in q) / len(q), sum(x[2] for x in q) / len(q))
                for vm, q in self.samples.items()
            }
