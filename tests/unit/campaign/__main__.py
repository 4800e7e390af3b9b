"""The campaign, run long: ``python -m tests.unit.campaign --steps 20000 --seed 1``.

Seeds ``--seed``, ``--seed + 1``, ... each run ``--per-seed`` operations until ``--steps`` in
all; each seed's run is reproducible alone (``--seed N --steps M --per-seed M``). The first
invariant that breaks stops the campaign: its schedule is shrunk to a minimal one that still
breaks it, printed as Python (paste it into a test: tests/unit/test_campaign_findings.py), and
the exit status is 1. Otherwise a summary for the README: seeds, operations, agent requests,
the operation and fault mix, simulated and wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from tests.unit.campaign.driver import Outcome, run
from tests.unit.campaign.schedule import Generator, Schedule, mix, starting_cluster
from tests.unit.campaign.shrink import Shrinker


def campaign(first_seed: int, steps: int, per_seed: int, log: bool = True) -> list[Outcome]:
    """Seeds from ``first_seed`` until ``steps`` operations ran (or an invariant broke)."""
    done: list[Outcome] = []
    seed, left = first_seed, steps
    while left > 0:
        n = min(per_seed, left)
        began = time.monotonic()
        out = run(Schedule(seed, starting_cluster(seed)), Generator(seed), n)
        done.append(out)
        if log:
            print(
                f"seed {seed}: {out.steps} operations, {out.requests} agent requests, "
                f"{sum(out.faults.values())} faults, {out.restarts} manager restarts, "
                f"{time.monotonic() - began:.1f} s"
                + (f": BROKEN {out.violations[0]}" if out.violations else ""),
                flush=True,
            )
        if out.violations:
            break
        seed, left = seed + 1, left - n
    return done


def summary(outcomes: list[Outcome], wall_s: float) -> str:
    ops: Counter[str] = Counter()
    results: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for o in outcomes:
        for what, n in o.ops.items():
            ops[what.split(":")[0]] += n
            results[what] += n
        faults.update(o.faults)
    seeds = [o.schedule.seed for o in outcomes]
    return "\n".join(
        [
            f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), "
            f"{sum(o.steps for o in outcomes)} operations (steps), "
            f"{sum(o.requests for o in outcomes)} agent requests, "
            f"{sum(o.checks for o in outcomes)} invariant checks, "
            f"{sum(o.restarts for o in outcomes)} manager restarts",
            f"simulated {sum(o.sim_s for o in outcomes) / 3600:.1f} h, wall {wall_s:.0f} s",
            f"operations: {mix(ops)}",
            f"faults ({sum(faults.values())}): {mix(faults)}",
            f"outcomes: {mix(results)}",
            f"notes ({sum(len(o.notes) for o in outcomes)}, e.g. an API error): "
            + "; ".join(n for o in outcomes for n in o.notes[:1])[:2000],
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.unit.campaign", description=__doc__)
    p.add_argument("--steps", type=int, default=2000, help="operations in all")
    p.add_argument("--seed", type=int, default=1, help="the first seed")
    p.add_argument("--per-seed", type=int, default=200, help="operations per seed")
    p.add_argument("--no-shrink", action="store_true", help="print the failing run as is")
    args = p.parse_args(argv)
    began = time.monotonic()
    outcomes = campaign(args.seed, args.steps, args.per_seed)
    print(summary(outcomes, time.monotonic() - began))
    broken = outcomes[-1]
    if not broken.violations:
        return 0
    print("\nINVARIANT BROKEN:", *broken.violations, sep="\n  ")
    if not args.no_shrink:
        print("shrinking...", flush=True)
        broken = Shrinker(broken, lambda msg: print(msg, flush=True)).shrink()
        print("\nminimal counterexample (breaks:", broken.violations[0], ")")
    print(broken.schedule.literal())
    print("\n".join(broken.log))
    return 1


if __name__ == "__main__":
    # Set iteration order must not differ between runs: a seed replays the same campaign.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "tests.unit.campaign", *sys.argv[1:]])
    sys.exit(main())
