"""What a move costs: the migration's predicted course over the link between its two hosts.

DRS asks the same model ``vm migrate --dry-run`` answers with
(``qmotion.migration.convergence.plan``, qmotion's default convergence settings, no postcopy):
the guest's measured dirty rate against the link measured between the two hosts. A move
``converges`` or not; if it converges only by throttling the guest's vCPUs it is not
``gentle``: balancing never makes such a move (the guest would notice it, for a gain in
balance it does not see), a mandatory move (an evacuation, a must rule) still does. A move
that does not converge is never planned; the plan says why.

Cost, in the objective's units (see state.py): a fixed part, the predicted seconds, and the
guest's write rate (while tracked, every page it writes first faults: the slowdown it feels
grows with its writes, not with the copy's length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from qmotion.drs.model import Snapshot, VmSpec
from qmotion.migration.convergence import DirtyMeasure, Limits, PathMeasure, plan

MiB = 1 << 20
COST_BASE = 0.00001
# A 1 GiB VM copied at 1 GiB/s costs what the older per-GiB price did (bench/drs.py keeps its
# comparison with hbal), and a move over a slow link costs as much more as it takes longer.
COST_PER_S = 0.000002
COST_PER_DIRTY_MIB_S = 0.000004


@dataclass(frozen=True)
class Forecast:
    """A move's predicted course: seconds to complete, and whether the guest notices it."""

    seconds: float
    converges: bool
    throttle_pct: int = 0
    why: str | None = None  # why balancing leaves this move (not gentle), else None
    dirty_mib_s: float = 0.0

    @property
    def gentle(self) -> bool:
        return self.converges and self.throttle_pct == 0

    @property
    def cost(self) -> float:
        return COST_BASE + COST_PER_S * self.seconds + COST_PER_DIRTY_MIB_S * self.dirty_mib_s

    def __add__(self, other: Forecast) -> Forecast:
        """Two VMs moved together (a must-affinity group): both must converge."""
        return Forecast(
            self.seconds + other.seconds,
            self.converges and other.converges,
            max(self.throttle_pct, other.throttle_pct),
            self.why or other.why,
            self.dirty_mib_s + other.dirty_mib_s,
        )


NONE = Forecast(0.0, True)


def forecast(vm: VmSpec, bandwidth_mib_s: float, rtt_ms: float) -> Forecast:
    """Moving ``vm`` over a link that carries ``bandwidth_mib_s`` with ``rtt_ms``."""
    resident = min(vm.mem_demand, vm.memory_mib)
    return _forecast(vm.memory_mib, resident, vm.dirty_rate_mib_s, bandwidth_mib_s, rtt_ms)


@lru_cache(maxsize=65536)
def _forecast(
    memory_mib: int, resident_mib: float, dirty_mib_s: float, bandwidth_mib_s: float, rtt_ms: float
) -> Forecast:
    if dirty_mib_s <= 0:
        # An idle guest: one pass, nothing to simulate (the common case on a large cluster).
        return Forecast(2 * rtt_ms / 1000 + resident_mib / bandwidth_mib_s, True)
    p = plan(
        memory_mib * MiB,
        int(resident_mib * MiB),
        DirtyMeasure(sweep_bps=dirty_mib_s * MiB),
        PathMeasure(bandwidth_mib_s * MiB, rtt_ms / 1000),
        Limits(),
    )
    rates = f"it dirties {dirty_mib_s:.0f} MiB/s, the link carries {bandwidth_mib_s:.0f}"
    if not p.converges:
        why = f"would not converge: {rates} MiB/s ({p.why_not or 'predicted'})"
    elif p.max_throttle_pct or p.throttle_from_start_pct:
        pct = max(p.max_throttle_pct, p.throttle_from_start_pct)
        why = f"would converge only with the guest throttled {pct}%: {rates} MiB/s"
    else:
        why = None
    return Forecast(
        p.total_s,
        p.converges,
        max(p.max_throttle_pct, p.throttle_from_start_pct),
        why,
        dirty_mib_s,
    )


class Prices:
    """The moves of one plan, priced: the links between hosts, and each unit's forecast from
    where it is in the cluster (not in the plan: a VM the plan moves twice migrates once)."""

    def __init__(self, snap: Snapshot, unit: Callable[[str], list[str]]) -> None:
        self.snap, self.unit = snap, unit
        self.vms = {v.name: v for v in snap.vms}
        self.origin = {v.name: v.host for v in snap.vms}
        self.links: dict[tuple[str, str], tuple[float, float]] = {}
        for x in snap.links:
            self.links[(x.source, x.target)] = (x.bandwidth_mib_s, x.rtt_ms)
            self.links.setdefault((x.target, x.source), (x.bandwidth_mib_s, x.rtt_ms))
        self.default = (snap.default_bandwidth_mib_s, snap.default_rtt_ms)
        # (unit leader, target) -> the unit's move there, predicted; with no link measured
        # every target is alike: unit leader -> its move anywhere (the planner's inner loop).
        self.forecasts: dict[tuple[str, str], Forecast] = {}
        self.anywhere: dict[str, Forecast] | None = None if self.links else {}

    def link(self, src: str, dst: str) -> tuple[float, float]:
        """(MiB/s, RTT ms) of the link between two hosts."""
        return self.links.get((src, dst), self.default)

    def forecast(self, key: str, dst: str) -> Forecast:
        """The unit led by ``key`` moved to ``dst``: every member not there already."""
        alike = self.anywhere is not None and all(self.origin[v] != dst for v in self.unit(key))
        got = self.anywhere.get(key) if self.anywhere is not None and alike else None
        if got is None:
            got = self.forecasts.get((key, dst))
        if got is None:
            got = Forecast(0.0, True)
            for vm in self.unit(key):
                src = self.origin[vm]
                if src != dst:
                    got = got + forecast(self.vms[vm], *self.link(src, dst))
            self.forecasts[(key, dst)] = got
            if self.anywhere is not None and alike:
                self.anywhere[key] = got
        return got

    def move_cost(self, key: str, dst: str, here: str) -> float:
        """What the plan's migrations cost more if the unit now planned on ``here`` ends on
        ``dst`` instead (a unit sent home saves its move)."""
        if here == dst:
            return 0.0
        return self._cost(key, dst) - self._cost(key, here)

    def _cost(self, key: str, host: str) -> float:
        """What the unit's migrations to ``host`` cost: nothing if every member is home
        there (a group's members may come from different hosts)."""
        if all(self.origin[v] == host for v in self.unit(key)):
            return 0.0
        return self.forecast(key, host).cost
