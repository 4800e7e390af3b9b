"""Fine tuning of a plan: exchanging the destinations of two VMs it already moves.

An exchange adds no migration (and a VM sent back home saves one), so it is tried after
balancing, among the moved VMs no rule holds, until no exchange helps. Each exchange is
priced as the planner prices a move (cost.py); one into a move the guest would notice is not
made.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from qmotion.drs.cost import Prices
from qmotion.drs.moves import Move, priority_of
from qmotion.drs.state import ClusterState

# Among at most this many moved VMs (the pairs grow as the square), this many sweeps, gains
# above rounding noise.
POLISH_MAX, POLISH_SWEEPS, POLISH_MIN_GAIN = 400, 8, 1e-7
# Even allocation is secondary: an exchange never makes demand less even (beyond rounding).
DEMAND_SLACK = 1e-12


def polish(
    st: ClusterState,
    origin: dict[str, str],
    held: Collection[str],
    info: Callable[[str], tuple[float, float, int, int]],
    prices: Prices,
    steps: list[Move],
) -> bool:
    """Exchange the destinations of two VMs this plan already moves when that balances
    better: fine tuning that adds no migration (and a VM sent back home saves one).
    Sweeps until no exchange helps; returns whether anything changed."""
    balanced = set(st.balanced)
    moved = sorted(
        v for v, h in st.placement.items() if h != origin[v] and h in balanced and v not in held
    )
    if len(moved) > POLISH_MAX:
        # The pairs grow as the square: fine-tune the VMs on the hosts farthest from the
        # mean load, where an exchange gains most.
        mc, mm = st.s1c / len(st.balanced), st.s1m / len(st.balanced)

        def off(v: str) -> float:
            h = st.hosts[st.placement[v]]
            return abs(h.cpu_load - mc) + abs(h.mem_load - mm)

        moved = sorted(sorted(moved, key=lambda v: (-off(v), v))[:POLISH_MAX])
    if len(moved) < 2:
        return False
    n = len(st.balanced)
    w, aw = st.mem_weight, st.alloc_weight
    # Per host: reciprocal capacities, loads and free memory, refreshed after exchanges.
    hosts: dict[str, tuple[float, ...]] = {}

    def refresh(name: str) -> None:
        h = st.hosts[name]
        ic, im = 1.0 / h.spec.cpu_capacity, 1.0 / h.spec.memory_mib
        hosts[name] = (
            ic,
            im,
            2 * h.cpu * ic,
            2 * h.mem * im,
            2 * h.allocated * im,
            2 * h.vcpus * ic,
            h.spec.memory_mib - h.allocated,
        )

    for name in balanced:
        refresh(name)
    changed = False
    for _ in range(POLISH_SWEEPS):
        improved = False
        for i, x in enumerate(moved):
            hx = st.placement[x]
            cx, mx, bx, vx = info(x)
            icx, imx, tcx, tmx, tax, tvx, roomx = hosts[hx]
            kc, km = 2 * st.s1c / n, 2 * st.s1m / n
            ka, kv = 2 * st.s1a / n, 2 * st.s1v / n
            best: tuple[float, str] | None = None
            for y in moved[i + 1 :]:
                hy = st.placement[y]
                if hy == hx:
                    continue
                cy, my, by, vy = info(y)
                icy, imy, tcy, tmy, tay, tvy, roomy = hosts[hy]
                # The exchange moves the difference of the two VMs from hx to hy; the
                # objective's change as in ClusterState.move_delta, inline for speed.
                db, dv = bx - by, vx - vy
                if db > roomy or -db > roomx:
                    continue
                a, b = db * imx, db * imy
                d1 = b - a
                alloc = a * (a - tax) + b * (b + tay) - d1 * (ka + d1 / n)
                a, b = dv * icx, dv * icy
                d1 = b - a
                alloc += a * (a - tvx) + b * (b + tvy) - d1 * (kv + d1 / n)
                t = cx - cy
                a, b = t * icx, t * icy
                d1 = b - a
                delta = a * (a - tcx) + b * (b + tcy) - d1 * (kc + d1 / n)
                t = mx - my
                a, b = t * imx, t * imy
                d1 = b - a
                delta += w * (a * (a - tmx) + b * (b + tmy) - d1 * (km + d1 / n))
                if aw and delta > DEMAND_SLACK:
                    continue
                gain = -delta - aw * alloc
                # What the exchange changes in the plan's migrations (one sent home saves
                # its move); an exchange into a move the guest would notice is not made.
                if hy != origin[x] and not prices.forecast(x, hy).gentle:
                    continue
                if hx != origin[y] and not prices.forecast(y, hx).gentle:
                    continue
                gain -= prices.move_cost(x, hy, hx) + prices.move_cost(y, hx, hy)
                if gain > POLISH_MIN_GAIN and (best is None or gain > best[0]):
                    best = (gain, y)
            if best is None:
                continue
            gain, y = best
            hy = st.placement[y]
            st.move(x, hy)
            st.move(y, hx)
            refresh(hx)
            refresh(hy)
            prio = priority_of(gain)
            steps.append(Move(x, hx, hy, prio, gain / 2, 0.0, "balance load"))
            steps.append(Move(y, hy, hx, prio, gain / 2, 0.0, "balance load"))
            improved = changed = True
        if not improved:
            break
    return changed
