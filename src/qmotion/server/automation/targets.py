"""The Migrate wizard's targets: every host ranked for moving one VM, with its verdict."""

from __future__ import annotations

from qmotion.api.drs import MigrationTarget, TargetRefusal
from qmotion.api.vm import VmState
from qmotion.drs.errors import SnapshotError
from qmotion.drs.placement import load_after_move, rank_moves
from qmotion.drs.recheck import rule_refusal
from qmotion.migration.prechecks import Refusal
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.errors import Conflict
from qmotion.server.tasks.runner import TaskRunner


def migration_targets(
    drs: ClusterDrs, runner: TaskRunner, vm: str, datastore: str | None
) -> list[MigrationTarget]:
    """Every host for moving ``vm`` (with ``datastore``: its disks there too), ranked as
    ``drs place`` and ``vm create`` rank hosts, the VM taken off its host first; each with
    what a submission would refuse now (the must rules, then the pre-checks). Feasible ones
    first, best score first. Without a datastore the VM's own host is listed as current, not
    a target; with one it is the storage move's target (the VM stays, its disks move)."""
    out_vm = drs.inventory.show_vm(vm, refresh=False)  # 404 for an unknown VM
    snap = drs.snapshot(links=False)
    try:
        ranked = rank_moves(snap, vm, drs._policy(snap))
        after = load_after_move(snap, vm)
    except SnapshotError as exc:
        raise Conflict(f"cannot rank the hosts: {exc}", code="invalid_cluster", vm=vm) from exc
    current = out_vm.host
    idle = out_vm.state in (VmState.STOPPED, VmState.SUSPENDED)
    # A running VM's disks move live: on its host (a storage move) or with it. A stopped
    # one's are copied by a cold migration, to another host only.
    live_disks = datastore is not None and not idle
    asked = [c.host for c in ranked if c.host != current or live_disks]
    verdicts = runner.target_refusals(vm, asked, datastore)
    live = drs.config.live()
    with drs.db.session() as s:
        stores = {h.name: sorted(h.datastores) for h in drs.inventory.host_views(s).values()}
    out = []
    for c in ranked:
        here = c.host == current
        refusals: list[Refusal] = []
        # The must rules come first, as the migrate route checks them before the pre-checks
        # (None on the VM's own host: a storage move is no move for the rules).
        why = rule_refusal(live, vm, c.host)
        if why is not None:
            refusals.append(Refusal("rule_violation", why, 409, field="to", host=c.host))
        refusals += verdicts.get(c.host, [])
        reasons = list(c.reasons)
        # The ranking refuses the current host as a new home; a storage move's verdict is
        # the pre-checks' alone (the VM stays where it is, whatever the ranking says).
        ranked_ok = c.feasible or (here and live_disks)
        if here and live_disks:
            reasons[reasons.index("current host")] = (
                f"current host: the VM stays, its disks move to {datastore}"
            )
        feasible = ranked_ok and not refusals
        out.append(
            MigrationTarget(
                host=c.host,
                current=here,
                feasible=feasible,
                score=c.score,
                reasons=reasons,
                refusals=[
                    TargetRefusal(code=r.code, message=r.message, field=r.field) for r in refusals
                ],
                free_memory_mib_after=after[c.host][0],
                cpu_committed_after=after[c.host][1],
                datastores=stores.get(c.host, []),
                # Room for the disks only the agent sees: asked when the move is submitted.
                notes=[f"free space on datastore {datastore} checked at submit"]
                if live_disks and feasible
                else [],
            )
        )
    out.sort(key=lambda t: (not t.feasible, t.score, t.host))
    return out
