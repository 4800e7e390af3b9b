"""``qmotion drs``: plan placement and balancing offline, on a snapshot or a Ganeti cluster."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from qmotion.cli.common import cells, console, fail, print_json

app = typer.Typer(help="DRS: placement and load balancing, offline (no manager needed).")


def _load(  # type: ignore[no-untyped-def]
    snapshot: Path | None,
    ganeti_text: Path | None,
    ganeti_util: Path | None,
    manager: bool = False,
    lab: str | None = None,
):
    from qmotion.drs import ganeti
    from qmotion.drs.model import Snapshot

    if [snapshot is not None, ganeti_text is not None, manager].count(True) != 1:
        fail(
            "give one of --snapshot FILE.json, --ganeti-text FILE [--ganeti-util FILE] "
            "or --manager",
            2,
        )
    if manager:
        from qmotion.cli.common import errors_exit
        from qmotion.cli.connect import server_client
        from qmotion.drs.inventory import snapshot_from_inventory

        with errors_exit(), server_client(lab) as client:
            return snapshot_from_inventory(client.hosts(), client.vms()), None
    if snapshot is not None:
        try:
            return Snapshot.model_validate_json(snapshot.read_text()), None
        except OSError as exc:
            fail(f"--snapshot: {exc}", 2)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            fail(f"--snapshot {snapshot}: {where}: {e['msg']}", 2)
    assert ganeti_text is not None
    from qmotion.drs.errors import SnapshotError

    try:
        cluster = ganeti.load(ganeti_text, ganeti_util)
    except OSError as exc:
        fail(f"--ganeti-text/--ganeti-util: {exc}", 2)
    except (SnapshotError, ValueError) as exc:
        fail(f"invalid cluster: {exc}", 2)
    return cluster.snapshot, cluster


@app.command("plan")
def plan_cmd(
    snapshot: Path = typer.Option(None, "--snapshot", help="Cluster snapshot JSON."),
    ganeti_text: Path = typer.Option(None, "--ganeti-text", help="htools text cluster file."),
    ganeti_util: Path = typer.Option(None, "--ganeti-util", help="htools utilisation file."),
    manager: bool = typer.Option(
        False, "--manager", help="Plan on the manager's inventory (read only: nothing moves)."
    ),
    lab: str = typer.Option(None, "--lab", help="With --manager: the lab whose manager."),
    threshold: int = typer.Option(
        3, "--threshold", min=1, max=5, help="1 mandatory moves only ... 5 aggressive"
    ),
    automation: str = typer.Option("manual", "--automation", help="manual, partial or full"),
    max_moves: int = typer.Option(
        None,
        "--max-moves",
        min=0,
        help="At most this many balancing moves, the best first (evacuations are never held "
        "back); planning again goes on from the result.",
    ),
    allocation_weight: float = typer.Option(
        None,
        "--allocation-weight",
        min=0,
        help="Weight of even memory allocation and vCPU commitment against demand "
        "(default: the policy's, or for a Ganeti cluster the weight hbal's units imply).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    emit_ganeti_text: Path = typer.Option(
        None, "--emit-ganeti-text", help="Write the planned placement as htools text."
    ),
) -> None:
    """Plan moves: evacuations and rule fixes first, then balance beyond the threshold."""
    from qmotion.drs import ganeti
    from qmotion.drs.errors import SnapshotError
    from qmotion.drs.model import Automation, Policy
    from qmotion.drs.planner import plan

    if automation not in ("manual", "partial", "full"):
        fail(f"--automation must be manual, partial or full, got {automation!r}", 2)
    snap, cluster = _load(snapshot, ganeti_text, ganeti_util, manager, lab)
    policy = Policy(threshold=threshold, automation=Automation(automation))
    if max_moves is not None:
        policy = policy.model_copy(update={"max_moves": max_moves})
    if allocation_weight is None and cluster is not None:
        allocation_weight = cluster.allocation_weight
    if allocation_weight is not None:
        policy = policy.model_copy(update={"allocation_weight": allocation_weight})
    try:
        result = plan(snap, policy, datetime.now(UTC))
    except SnapshotError as exc:
        fail(f"invalid snapshot: {exc}", 2)
    if emit_ganeti_text is not None:
        if cluster is None:
            fail("--emit-ganeti-text needs --ganeti-text input", 2)
        emit_ganeti_text.write_text(ganeti.dump(cluster, result.placement))
    if json_out:
        print_json(result.to_json())
        return
    table = Table("wave", "VM", "from", "to", "priority", "net gain", "reason")
    for m in result.moves:
        table.add_row(
            *cells(m.wave, m.vm, m.source, m.target, m.priority, f"{m.gain - m.cost:.4f}", m.reason)
        )
    console.print(table)
    console.print(
        f"{len(result.moves)} moves; imbalance {result.imbalance_before:.4f} -> "
        f"{result.imbalance_after:.4f}"
    )
    for b in result.broken_should:
        rule, why = escape(str(b["rule"])), escape(str(b["why"]))
        console.print(f"[yellow]breaks should rule {rule}[/]: {why}")
    for u in result.unplaced:
        vm_name, reason = escape(str(u["vm"])), escape(str(u["reason"]))
        console.print(f"[red]cannot place {vm_name}[/]: {reason}")


@app.command("place")
def place_cmd(
    snapshot: Path = typer.Option(None, "--snapshot", help="Cluster snapshot JSON."),
    manager: bool = typer.Option(False, "--manager", help="Rank the manager's hosts."),
    lab: str = typer.Option(None, "--lab", help="With --manager: the lab whose manager."),
    vm: str = typer.Option(..., "--vm", help='JSON of the VM, e.g. {"name":"x","memory_mib":4096}'),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Rank hosts for a new VM, each with its reasons."""
    from qmotion.drs.errors import SnapshotError
    from qmotion.drs.model import Policy, VmSpec
    from qmotion.drs.planner import place

    snap, _ = _load(snapshot, None, None, manager, lab)
    try:
        spec = VmSpec.model_validate({"host": "-", **json.loads(vm)})
        ranked = place(snap, spec, Policy())
    except (ValueError, SnapshotError) as exc:
        fail(f"--vm: {exc}", 2)
    if json_out:
        print_json([c.__dict__ for c in ranked])
        return
    for c in ranked:
        mark = "[green]ok[/]" if c.feasible else "[red]no[/]"
        reasons = escape("; ".join(c.reasons))
        console.print(f"{mark} {escape(c.host)} score {c.score:.4f}: {reasons}")
