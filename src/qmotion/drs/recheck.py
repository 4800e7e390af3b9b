"""The re-check of one move against the live cluster, just before it starts. Pure.

As Nomad's plan applier re-checks each node's part of a plan on the latest state snapshot
(``evaluateNodePlan``), the manager re-checks every DRS or maintenance move when its turn
comes: the cluster may have changed since the plan. The manager gathers a ``LiveCluster``
from its inventory; the verdict is decided here, on plain values. The same rule check refuses
an operator's migration, or a new VM, on a host a must rule forbids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qmotion.drs.model import Rule
from qmotion.drs.rules import broken_by_move


@dataclass(frozen=True)
class LiveHost:
    """A host as the inventory has it."""

    state: str  # up, down, maintenance, entering-maintenance
    health: str | None = None  # as its agent last reported: ok or degraded (None: no facts)
    health_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class LiveCluster:
    """A snapshot of the inventory: where each VM is (VM -> host), the placement rules
    (whichever VMs they name), the migrations under way (VM -> destination), the hosts, and
    whether a degraded host takes moves (``drs.proactive``: it does not)."""

    placement: Mapping[str, str]
    rules: Sequence[Rule] = ()
    inflight: Mapping[str, str] = field(default_factory=dict)
    hosts: Mapping[str, LiveHost] = field(default_factory=dict)
    proactive: bool = False


def rule_refusal(
    live: LiveCluster,
    vm: str,
    to: str,
    *,
    new: bool = False,
    also: Mapping[str, str] | None = None,
) -> str | None:
    """Why ``vm`` may not go to ``to`` (the must rules it would break), or None; ``new``: the
    VM is being created; ``also``: other VMs' hosts once moves made with this one are done."""
    placement = {**live.placement, **(also or {})}
    if new:
        placement.pop(vm, None)
    elif placement.get(vm) == to:
        return None  # not a move (a storage move on its host)
    # A VM migrating now is at its source and soon at its destination: both count.
    broken = broken_by_move(live.rules, placement, vm, to)
    landing = {k: v for k, v in {**placement, **live.inflight}.items() if k != vm}
    broken += [r for r in broken_by_move(live.rules, landing, vm, to) if r not in broken]
    if not broken:
        return None
    names = ", ".join(r.name for r in broken)
    return f"{vm} on {to} would break must rule {names} (--force to do it anyway)"


def recheck(
    live: LiveCluster,
    vm: str,
    source: str,
    target: str,
    planned: Mapping[str, str] | None = None,
    submitted: Mapping[str, str] | None = None,
) -> str | None:
    """Why the planned move of ``vm`` from ``source`` to ``target`` may not start now, or None.

    ``submitted`` (VM -> target): the operation's moves already submitted, which count as
    made; ``planned``: its moves still planned, of which those of the VM's must-affinity
    partners count as made too (each member is checked against the others' new host; a
    partner whose move was skipped or failed is no longer planned, so the rest of its group
    stays too)."""
    partners = {
        o
        for r in live.rules
        if r.kind == "affinity" and r.strength == "must" and vm in r.vms
        for o in r.vms
    }
    also = {v: t for v, t in (planned or {}).items() if v in partners and v != vm}
    also |= submitted or {}
    where = live.placement.get(vm)
    if where is None:
        return "the VM no longer exists"
    if where != source:
        return f"it is on {where} now, not {source}"
    dst = live.hosts.get(target)
    if dst is None or dst.state != "up":
        return f"host {target} is {dst.state if dst else 'gone'}"
    if dst.health == "degraded" and live.proactive:
        return f"host {target} is degraded: {'; '.join(dst.health_reasons)}"
    return rule_refusal(live, vm, target, also=also)
