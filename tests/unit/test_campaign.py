"""The randomized fault campaign of issue 22 (tests.unit.campaign), a fixed part of it: the
real manager (task runner, port, machine, DRS, maintenance, reconcile) driving the scripted
agents through migrations, shared-nothing and storage moves, cancels, DRS applies and
maintenance, with a fault at any agent request (5xx, timeout, an agent unreachable or
restarting, QEMU completing at that moment, the manager restarting). At most one copy of each
VM runs at every request, no copy resumes older memory, no file a VM uses goes; at the end
each VM runs once, where the inventory says, and nothing is left that no record names.

The long run: ``make campaign`` (``python -m tests.unit.campaign --steps 20000``).
"""

from __future__ import annotations

from collections import Counter

import httpx

from tests.unit.campaign.driver import run
from tests.unit.campaign.schedule import (
    OP_WEIGHTS,
    Generator,
    Op,
    Placed,
    Schedule,
    starting_cluster,
)
from tests.unit.campaign.shrink import Shrinker
from tests.unit.campaign.world import CampaignWorld, Fault, Injected

SEEDS = (1, 2, 3)
STEPS = 100  # per seed: 300 operations, about 3 000 agent requests and 150 faults


def test_the_fixed_campaign_breaks_no_invariant() -> None:
    ops: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for seed in SEEDS:
        out = run(Schedule(seed, starting_cluster(seed)), Generator(seed), STEPS)
        assert out.violations == [], (seed, out.violations, "\n".join(out.log))
        ops.update(k.split(":")[0] for k in out.ops.elements())
        faults.update(out.faults)
    # The campaign does what it says: every kind of operation, every kind of fault.
    assert set(ops) >= set(OP_WEIGHTS), ops
    assert set(faults) == {str(f) for f in Fault}, faults


class LateCancelResumes(CampaignWorld):
    """A planted agent bug: a cancel that comes after QEMU completed resumes the source."""

    def _answer(self, host: str, req: httpx.Request) -> httpx.Response:
        name = req.url.path.split("/")[3] if req.url.path.startswith("/v1/vms/") else ""
        vm = self.vms[host].get(name)
        late = vm is not None and vm.runstate == "postmigrate"
        if req.url.path.endswith("/migration/cancel") and vm is not None and late:
            vm.runstate = "running"
        return super()._answer(host, req)


def test_the_campaign_finds_a_planted_bug_and_shrinks_it() -> None:
    out = run(Schedule(1, starting_cluster(1)), Generator(1), 20, world=LateCancelResumes)
    assert out.violations and " runs on " in out.violations[0], out.violations
    small = Shrinker(out, world=LateCancelResumes, max_tries=30).shrink()
    assert " runs on " in small.violations[0]
    assert len(small.schedule.ops) <= len(out.schedule.ops), small.schedule
    assert len(small.schedule.faults) < len(out.schedule.faults), small.schedule
    # The counterexample prints as Python that replays it.
    names = {"Schedule": Schedule, "Placed": Placed, "Op": Op, "Injected": Injected}
    again = eval(small.schedule.literal(), {**names, "Fault": Fault})
    assert run(again, world=LateCancelResumes).violations == small.violations


def test_a_seed_replays_the_same_run() -> None:
    first = run(Schedule(4, starting_cluster(4)), Generator(4), 25)
    replayed = run(first.schedule)
    assert replayed.log == first.log and replayed.requests == first.requests
    assert replayed.faults == first.faults
