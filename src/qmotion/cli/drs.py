"""``qmotion drs``: plan placement and balancing offline, on a snapshot or a Ganeti cluster."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qmotion.api.drs import RecommendationOut
from qmotion.cli.common import cells, console, fail, print_json

app = typer.Typer(
    help="DRS: recommendations and moves on the live cluster (run, recommendations, apply); "
    "placement and balancing plans offline (plan, place)."
)
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


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
    lab: str = LabOpt,
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
    from qmotion.api.drs import Automation
    from qmotion.drs import ganeti
    from qmotion.drs.errors import SnapshotError
    from qmotion.drs.model import Policy
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
    for u in result.left:
        vm_name, reason = escape(str(u["vm"])), escape(str(u["reason"]))
        console.print(f"[yellow]left {vm_name}[/]: {reason}")


@app.command("place")
def place_cmd(
    snapshot: Path = typer.Option(None, "--snapshot", help="Cluster snapshot JSON."),
    manager: bool = typer.Option(False, "--manager", help="Rank the manager's hosts."),
    lab: str = LabOpt,
    vm: str = typer.Option(..., "--vm", help='JSON of the VM, e.g. {"name":"x","memory_mib":4096}'),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Rank hosts for a new VM, each with its reasons."""
    from qmotion.drs.errors import SnapshotError
    from qmotion.drs.model import Policy, VmSpec
    from qmotion.drs.placement import Candidate, place

    try:
        spec = VmSpec.model_validate({"host": "-", **json.loads(vm)})
    except ValueError as exc:
        fail(f"--vm: {exc}", 2)
    if manager:
        # The manager ranks on the live inventory: its rules, measured demand, migrations
        # under way.
        from qmotion.cli.common import errors_exit
        from qmotion.cli.connect import server_client

        with errors_exit(), server_client(lab) as client:
            live = client.place(spec.memory_mib, spec.vcpus)
        ranked = [Candidate(c.host, c.feasible, c.score, c.reasons) for c in live]
    else:
        snap, _ = _load(snapshot, None, None, manager, lab)
        try:
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


def _recs_table(recs: list[RecommendationOut]) -> Table:
    table = Table("id", "wave", "VM", "from", "to", "priority", "net gain", "state", "reason")
    for r in recs:
        table.add_row(
            *cells(
                r.id,
                r.wave,
                r.vm,
                r.source,
                r.target,
                r.priority,
                f"{r.gain:.4f}",
                r.state
                if r.retry_after is None
                else f"{r.state}, backing off until {r.retry_after:%H:%M:%S}",
                r.message or r.reason,
            )
        )
    return table


@app.command("run")
def run_cmd(json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """Plan on the live cluster and store the moves as recommendations (with automation full,
    also apply them)."""
    from qmotion.cli.common import errors_exit
    from qmotion.cli.connect import server_client

    with errors_exit(), server_client(lab) as client:
        out = client.drs_run()
    if json_out:
        print_json(out.model_dump(mode="json"))
        return
    console.print(_recs_table(out.recommendations))
    console.print(
        Text(
            f"run {out.run_id} ({out.automation}, threshold {out.threshold}): "
            f"{len(out.recommendations)} moves; imbalance {out.imbalance_before:.4f} -> "
            f"{out.imbalance_after:.4f}; measured demand for {out.measured_vms} VMs"
        )
    )
    if out.applied_task is not None:
        console.print(Text(f"applying: task {out.applied_task}"))
    for u in out.unplaced:
        console.print(Text(f"cannot place {u.get('vm')}: {u.get('reason')}", style="red"))
    for u in out.left:
        console.print(Text(f"left {u.get('vm')}: {u.get('reason')}", style="yellow"))


@app.command("recommendations")
def recommendations_cmd(
    all_states: bool = typer.Option(False, "--all", help="also applied, failed, superseded"),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """The pending recommendations of the last run (with --all, recent ones of any state)."""
    from qmotion.cli.common import errors_exit
    from qmotion.cli.connect import server_client

    with errors_exit(), server_client(lab) as client:
        recs = client.recommendations(all_states=all_states)
        waiting = [] if all_states or json_out else client.recommendations(all_states=True)
    if json_out:
        print_json([r.model_dump(mode="json") for r in recs])
        return
    console.print(_recs_table(recs))
    # The failed moves held back meanwhile, once per VM and target (newest first: the row
    # of the last failure); --all shows them in the table.
    shown: set[tuple[str, str]] = set()
    for r in waiting:
        if r.retry_after is not None and (r.vm, r.target) not in shown:
            shown.add((r.vm, r.target))
            console.print(
                Text(
                    f"backing off: {r.vm} -> {r.target} not before "
                    f"{r.retry_after:%Y-%m-%d %H:%M:%S} UTC (failed: {r.message or '?'})",
                    style="yellow",
                )
            )


@app.command("apply")
def apply_cmd(
    ids: list[int] = typer.Argument(None, help="recommendation ids"),
    all_: bool = typer.Option(False, "--all", help="every pending recommendation"),
    wait: bool = typer.Option(False, "--wait", help="return when every move has ended"),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Run recommendations as migrations, wave by wave, each re-checked just before it starts."""
    from qmotion.api.drs import ApplyRequest
    from qmotion.cli import operation
    from qmotion.cli.common import errors_exit
    from qmotion.cli.connect import server_client

    try:
        req = ApplyRequest(ids=ids or [], all=all_)
    except ValidationError as exc:
        fail(f"give recommendation ids or --all: {exc.errors()[0]['msg']}", 2)
    with errors_exit(), server_client(lab) as client:
        task = client.drs_apply(req)
        if wait:
            task = operation.wait(client, task.id, "applying DRS moves", operation.WAIT_S)
    if wait:
        operation.show(task, json_out)
        if task.state != "succeeded":
            raise typer.Exit(1)
    elif json_out:
        print_json(task.model_dump(mode="json"))
    else:
        console.print(Text(f"applying: task {task.id}; `qmotion task show {task.id}`"))
