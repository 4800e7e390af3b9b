"""The DRS planner's properties run randomised and long: ``python -m tests.unit.drs_random``.

CI runs the properties derandomised (the same examples every run, test_drs_properties.py);
this runs ``--examples`` fresh random examples per hypothesis seed, for seeds ``--first`` ..
``--last``, of the plan invariant (``test_safety``: every must rule holds or its breakers are
listed unplaced, no VM both moved and unplaced, memory never overcommitted, every move
converges, balancing only by moves the guest does not notice) and of the fixed point
(``test_no_ping_pong_at_default_threshold``). The first failure stops the run with its
falsifying example (exit 1); else a summary line for the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.unit import test_drs_properties as props

PROPERTIES: dict[str, tuple[Callable[..., None], Any]] = {
    "safety": (props.test_safety.hypothesis.inner_test, st.integers(1, 5)),  # type: ignore[attr-defined]
    "fixed point": (
        props.test_no_ping_pong_at_default_threshold.hypothesis.inner_test,  # type: ignore[attr-defined]
        props.WEIGHTS,
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--last", type=int, default=100)
    ap.add_argument("--examples", type=int, default=500, help="per seed and property")
    args = ap.parse_args()
    began = time.monotonic()
    total = 0
    for seed in range(args.first, args.last + 1):
        for name, (inner, second) in PROPERTIES.items():
            test = settings(
                max_examples=args.examples,
                deadline=None,
                derandomize=False,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(props.clusters(), second)(inner))
            try:
                hypothesis_seed(seed)(test)()
            except Exception as exc:  # the falsifying example is in hypothesis's report
                print(f"seed {seed}, {name}: FAILED: {exc!r}", flush=True)
                return 1
            total += args.examples
        print(f"seed {seed}: ok ({total} examples, {time.monotonic() - began:.0f} s)", flush=True)
    print(
        f"DRS properties randomised: seeds {args.first}..{args.last}, {total} examples "
        f"({args.examples} per seed and property), no failure, {time.monotonic() - began:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
