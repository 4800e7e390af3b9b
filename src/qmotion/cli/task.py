"""``qmotion task``: list, show and cancel long operations."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qmotion.api.migration import timeline
from qmotion.cli.common import cells, console, errors_exit, fail, more_hint, print_json
from qmotion.cli.connect import server_client
from qmotion.cli.vm import stats_line

app = typer.Typer(help="Tasks: every long operation, persisted with its progress and events.")
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")


@app.command("list")
def list_(
    limit: int = typer.Option(None, "--limit", help="At most this many tasks (default 100)."),
    after: int = typer.Option(None, "--after", help="Continue after this task id."),
    json_out: bool = typer.Option(False, "--json"),
    lab: str = LabOpt,
) -> None:
    """Recent tasks, newest first; a page at a time (``more: --after ID`` continues)."""
    with errors_exit(), server_client(lab) as client:
        page = client.task_page(limit=limit, after=after)
    tasks = page.items
    if json_out:
        print_json([t.model_dump(mode="json") for t in tasks])
        return
    table = Table("id", "kind", "state", "vm", "from", "to", "phase", "progress")
    for t in tasks:
        table.add_row(
            *cells(
                t.id,
                t.kind,
                t.state,
                t.vm or "-",
                t.source or "-",
                t.destination or "-",
                t.phase or "-",
                f"{t.progress:.0%}",
            )
        )
    console.print(table)
    more_hint(page.next_after)


@app.command("show")
def show(task_id: int, json_out: bool = typer.Option(False, "--json"), lab: str = LabOpt) -> None:
    """One task with its events and result."""
    with errors_exit(), server_client(lab) as client:
        t = client.task(task_id)
    if json_out:
        print_json(t.model_dump(mode="json"))
        return
    console.print(Text(f"task {t.id} {t.kind} {t.vm}: {t.state} ({t.phase}) {t.progress:.0%}"))
    if t.error:
        console.print(f"[red]error:[/] {escape(t.error)}")
    if t.stats is not None and t.state.active:
        console.print(Text(f"  now: {stats_line(t)}"))
    for e in t.events:
        console.print(Text(f"  {e.at:%H:%M:%S.%f} {e.kind}: {e.message}"))
    if t.result:
        print_json(t.result.model_dump(mode="json"))
    if t.operation:
        print_json(t.operation.model_dump(mode="json"))


@app.command("report")
def report(
    task_id: int,
    json_out: bool = typer.Option(False, "--json"),
    plot_file: Path = typer.Option(None, "--plot", help="Write a PNG of the migration here."),
    lab: str = LabOpt,
) -> None:
    """A migration's flight recorder: per-second samples, the ladder, the switchover."""
    with errors_exit(), server_client(lab) as client:
        t = client.task(task_id)
    r = t.result
    if r is None:
        fail(f"task {t.id} has no report yet ({t.state}, {t.phase})", 1)
    if plot_file is not None:
        from qmotion.cli.plot import plot

        if not r.samples:
            fail(f"task {t.id} recorded no samples to plot", 1)
        try:
            plot(r, plot_file)
        except OSError as exc:
            fail(f"--plot: cannot write {plot_file}: {exc}", 2)
    if json_out:
        print_json(
            r.model_dump(mode="json")
            | {"timeline": [{"event": e, "ms": ms} for e, ms in timeline(r)]}
        )
        return
    total = f"{r.total_ms / 1000:.2f} s" if r.total_ms is not None else "-"
    disks = f"disk copy {r.disk_copy_ms / 1000:.2f} s, " if r.disk_copy_ms is not None else ""
    whole = (
        f"whole task {(t.ended_at - t.started_at).total_seconds():.2f} s, "
        if t.started_at is not None and t.ended_at is not None
        else ""
    )
    console.print(
        Text(
            f"task {t.id}: {r.vm} {r.source} -> {r.destination}: {r.outcome}; {whole}{disks}"
            f"RAM migration (QEMU) {total}, "
            f"downtime {r.downtime_ms if r.downtime_ms is not None else '-'} ms, "
            f"{r.streams or 1} stream(s) to {r.migration_address or '-'}, "
            f"TLS {'yes' if r.tls else 'no'}, rungs {' > '.join(r.rungs) or '-'}, "
            f"throttled {r.throttled_s:.1f} s"
            + (
                f", postcopy from {r.postcopy_at_s:.1f} s"
                f" ({r.postcopy_recoveries} stream recoveries)"
                if r.postcopy_at_s is not None
                else ""
            )
        )
    )
    table = Table(
        "t s",
        "sent MiB",
        "remaining MiB",
        "dirty MiB/s",
        "MiB/s",
        "throttle %",
        "pass",
        "rung",
        "downtime limit ms",
    )
    for s in r.samples:
        table.add_row(
            *cells(
                f"{s.t_s:.1f}",
                f"{s.transferred / 2**20:.0f}",
                f"{s.remaining / 2**20:.0f}",
                f"{s.dirty_bps / 2**20:.1f}",
                f"{s.throughput_bps / 2**20:.1f}",
                s.throttle_pct,
                s.passes,
                s.rung,
                s.downtime_limit_ms,
            )
        )
    console.print(table)
    if r.start_timeline:
        console.print(Text("request accepted -> stream started, step by step:"))
        for st in r.start_timeline:
            console.print(Text(f"  +{st.start_ms:8.1f} ms  {st.ms:8.1f} ms  {st.step}"))
    for event, ms in timeline(r):
        console.print(Text(f"  +{ms:8.1f} ms  {event}"))
    for w in r.warnings:
        console.print(Text(f"  warning: {w}"))
    if plot_file is not None:
        console.print(Text(f"plot written to {plot_file}"))


@app.command("cancel")
def cancel(
    task_id: int,
    json_out: bool = typer.Option(False, "--json", help="Print the task as JSON."),
    lab: str = LabOpt,
) -> None:
    """Cancel a queued or running task; a cancelled migration leaves the VM on its source."""
    with errors_exit(), server_client(lab) as client:
        t = client.cancel_task(task_id)
    if json_out:
        print_json(t.model_dump(mode="json"))
        return
    console.print(Text(f"task {t.id}: cancel requested ({t.state})"))
