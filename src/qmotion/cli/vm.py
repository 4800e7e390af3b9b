"""``qmotion vm``: create, start, stop, delete, list, show and live-migrate VMs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Group, RenderableType
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from qmotion.api.migration import MigrationPrediction
from qmotion.api.server import (
    DiskCreate,
    MigrateRequest,
    TaskOut,
    TaskState,
    VmCreate,
    VmOut,
    Workload,
)
from qmotion.api.sizes import format_size, parse_rate_bytes, parse_size
from qmotion.cli.common import cells, console, data_table, errors_exit, fail, more_hint, print_json
from qmotion.cli.connect import server_client
from qmotion.migration.timeline import slowest

app = typer.Typer(help="Virtual machines, through the manager.")
LabOpt = typer.Option(None, "--lab", help="Which lab's manager, if several are up.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def parse_workload(text: str) -> Workload:
    """``fill=600M,dirty=20M/s,hot=64M,disk=20M/s,cpu=80%`` -> fill 600 MiB, dirty 20 MiB/s,
    64 MiB hot set, 20 MiB/s written to its first disk (besides the checked records), 80% of
    a vCPU kept busy.

    The hot set (optional) is the first ``hot`` of the fill, rewritten over and over with half of
    the dirty rate; the other half sweeps the rest of the fill (see ``Workload.hot_mib``).
    """
    fill, dirty, hot, disk, cpu = 0, 0.0, 0, 0.0, 0.0
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not KEY=VALUE")
        if key == "fill":
            fill = parse_size(value) >> 20
        elif key == "dirty":
            dirty = parse_rate_bytes(value) / (1 << 20)
        elif key == "hot":
            hot = 0 if value.strip() == "0" else parse_size(value) >> 20
            if value.strip() != "0" and hot == 0:
                raise ValueError(f"hot={value} is less than 1 MiB (use hot=0 for no hot set)")
        elif key == "disk":
            disk = parse_rate_bytes(value) / (1 << 20)
        elif key == "cpu":
            try:
                cpu = float(value.strip().removesuffix("%"))
            except ValueError:
                raise ValueError(f"cpu={value}: a percentage of one vCPU, e.g. cpu=80%") from None
        else:
            raise ValueError(f"unknown workload key {key!r} (fill, dirty, hot, disk, cpu)")
    return Workload(fill_mib=fill, dirty_mib_s=dirty, hot_mib=hot, disk_mib_s=disk, cpu_pct=cpu)


def _vm_table(vms: list[VmOut]) -> RenderableType:
    """One row per VM; the attention column only when a VM needs an operator (its state is
    then marked "!"). Name, host, address and MAC are never cut: on a narrow terminal the CPU
    model and the memory columns go first, then attention moves below the table."""
    columns = ["name", "host", "state", "address", "MAC", "memory", "CPU model"]
    if any(v.attention for v in vms):
        columns.append("attention")
    rows = [
        [
            v.name,
            v.host,
            v.state + (" (migrating)" if v.migrating else "") + (" !" if v.attention else ""),
            v.address or "-",
            v.mac,
            f"{v.memory_mib} MiB",
            v.cpu_model,
            v.attention or "-",
        ][: len(columns)]
        for v in vms
    ]
    table = data_table(
        columns,
        rows,
        copied=("name", "host", "address", "MAC"),
        droppable=("CPU model", "memory", "attention"),
    )
    shown = {c.header for c in table.columns}
    if "attention" in columns and "attention" not in shown:
        notes = [Text(f"{v.name} needs attention: {v.attention}") for v in vms if v.attention]
        return Group(table, *notes)
    return table


def parse_disk(text: str) -> DiskCreate:
    """``DATASTORE[:SIZE[:FORMAT]]`` (256M and qcow2 when not given)."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"--disk {text!r}: expected DATASTORE:SIZE[:qcow2|raw]")
    size = parts[1] if len(parts) > 1 and parts[1] else "256M"
    fmt = parts[2] if len(parts) == 3 else "qcow2"
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"--disk {text!r}: format {fmt!r} is not qcow2 or raw")
    return DiskCreate.model_validate(
        {"datastore": parts[0], "size_mib": parse_size(size) >> 20, "format": fmt}
    )


@app.command("create")
def create(
    name: str,
    host: str = typer.Option(
        None, "--host", help="Host to place the VM on; default: the host DRS picks."
    ),
    force: bool = typer.Option(
        False, "--force", help="with --host: even if a must placement rule forbids it"
    ),
    memory: str = typer.Option(..., "--memory", help="e.g. 512M, 1G"),
    vcpus: int = typer.Option(1, "--vcpus"),
    workload: str = typer.Option(None, "--workload", help="fill=600M,dirty=20M/s"),
    address: str = typer.Option(None, "--address", help="IPv4/prefix; default from the pool"),
    disk: list[str] = typer.Option(
        None,
        "--disk",
        help="DATASTORE:SIZE[:qcow2|raw], e.g. shared:256M; repeatable (after an --image disk, "
        "or after the first)",
    ),
    image: str = typer.Option(
        None, "--image", help="Boot from a full copy of this library image (with --datastore)."
    ),
    datastore: str = typer.Option(None, "--datastore", help="Where the image's copy goes."),
    disk_size: str = typer.Option(
        None, "--disk-size", help="Grow the image's copy to this size, e.g. 8G."
    ),
    user_data: Path = typer.Option(
        None,
        "--user-data",
        exists=True,
        dir_okay=False,
        readable=True,
        help="With --image: a file of #cloud-config lines for its seed.",
    ),
    start: bool = typer.Option(False, "--start", help="Start it right away."),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Create a VM (unique MAC and UUID, cluster CPU model, address from the pool): the test
    guest, or with --image a user's own guest booting from its copy of a library image."""
    try:
        wl = parse_workload(workload) if workload else None
        dk = None
        extra = [parse_disk(d) for d in disk or []]
        if image is not None:
            if datastore is None:
                raise ValueError("--image takes --datastore DS: where the VM's copy goes")
            size = parse_size(disk_size) >> 20 if disk_size else None
            dk = DiskCreate(datastore=datastore, size_mib=size)
        elif datastore is not None or disk_size is not None:
            raise ValueError("--datastore and --disk-size go with --image; else use --disk")
        elif extra:
            dk, extra = extra[0], extra[1:]
        req = VmCreate.model_validate(
            {
                "name": name,
                "host": host,
                "memory": memory,
                "vcpus": vcpus,
                "workload": wl,
                "address": address,
                "disk": dk,
                "extra_disks": extra,
                "image": image,
                "user_data": user_data.read_text() if user_data else None,
                "start": start,
                "force": force,
            }
        )
    except ValueError as exc:
        fail(str(exc), 2)
    with errors_exit(), server_client(lab) as client:
        vm = client.create_vm(req)
    if json_out:
        print_json(vm.model_dump(mode="json"))
    else:
        console.print(_vm_table([vm]))
        if vm.placement is not None and vm.placement.chosen_by == "drs":
            console.print(Text(f"placed on {vm.host} by DRS:"))
            for c in vm.placement.candidates:
                mark = "chosen" if c.host == vm.host else "ok" if c.feasible else "refused"
                console.print(
                    Text(f"  {c.host:<12} {mark:<8} score {c.score:.4f}  {'; '.join(c.reasons)}")
                )


def _vm_line(vm: VmOut, json_out: bool, where: bool = True) -> None:
    """What a VM lifecycle command prints: the VM (``--json``), or its state in a line."""
    if json_out:
        print_json(vm.model_dump(mode="json"))
    else:
        console.print(Text(f"{vm.name} is {vm.state}" + (f" on {vm.host}" if where else "")))


@app.command("start")
def start(name: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Start a VM on its host."""
    with errors_exit(), server_client(lab) as client:
        vm = client.start_vm(name)
    _vm_line(vm, json_out)


@app.command("suspend")
def suspend(name: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Save a running VM's memory and device state to its datastore and stop it."""
    with errors_exit(), server_client(lab) as client:
        vm = client.suspend_vm(name)
    _vm_line(vm, json_out)


@app.command("resume")
def resume(name: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """Run a suspended VM again where it was (on its host now, after a migration too)."""
    with errors_exit(), server_client(lab) as client:
        if (state := client.vm(name).state) != "suspended":
            fail(f"{name} is {state}, not suspended: `vm start` boots a stopped VM", 1)
        vm = client.start_vm(name)
    _vm_line(vm, json_out)


@app.command("stop")
def stop(
    name: str,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Stop a VM: ACPI power button, then forced if the guest does not comply."""
    with errors_exit(), server_client(lab) as client:
        vm = client.stop_vm(name, force=force)
    _vm_line(vm, json_out, where=False)


@app.command("resolve")
def resolve(
    name: str,
    keep: str | None = typer.Option(
        None, "--keep", help="the host whose copy is the VM: every other copy is removed"
    ),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Clear a VM's attention mark once you decided where it is. Without --keep, only if no
    host but its recorded one holds a copy; with --keep HOST, HOST's copy becomes the VM in
    the inventory and the other hosts' copies are ended (disk files are left in place)."""
    with errors_exit(), server_client(lab) as client:
        vm = client.resolve_vm(name, keep=keep)
    if json_out:
        print_json(vm.model_dump(mode="json"))
        return
    console.print(Text(f"{vm.name}: {vm.state} on {vm.host}, no attention needed"))


@app.command("delete")
def delete(
    name: str,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Delete a VM (a running one only with --force). With --force, a VM its host no longer
    has is forgotten. ``--json``: ``{"deleted": NAME}``."""
    with errors_exit(), server_client(lab) as client:
        client.delete_vm(name, force=force)
    if json_out:
        print_json({"deleted": name})
    else:
        console.print(Text(f"{name} deleted"))


@app.command("list")
def list_(
    limit: int = typer.Option(None, "--limit", help="At most this many VMs (default: all)."),
    after: str = typer.Option(None, "--after", help="Continue after this VM name."),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """The cluster's VMs by name (``more: --after NAME`` continues a --limit page)."""
    with errors_exit(), server_client(lab) as client:
        page = client.vm_page(limit=limit, after=after)
    if json_out:
        print_json([v.model_dump(mode="json") for v in page.items])
    else:
        console.print(_vm_table(page.items))
        more_hint(page.next_after)


@app.command("show")
def show(name: str, json_out: bool = JsonOpt, lab: str = LabOpt) -> None:
    """One VM: host, state, MAC, address, CPU model."""
    with errors_exit(), server_client(lab) as client:
        vm = client.vm(name)
    if json_out:
        print_json(vm.model_dump(mode="json"))
    else:
        console.print(_vm_table([vm]))


def mirror_line(task: TaskOut) -> str:
    m = task.mirror
    if m is None:
        return str(task.phase or task.state)
    done = m.total_bytes - m.remaining_bytes
    return " | ".join(
        [
            f"{format_size(done)} of {format_size(m.total_bytes)} copied",
            f"{format_size(m.remaining_bytes)} left",
            f"{m.rate_bps / 1e6:.0f} MB/s",
            f"{m.copy_mode} copy",
            str(task.phase or task.state),
        ]
    )


def stats_line(task: TaskOut) -> str:
    if task.kind == "storage-move":
        return mirror_line(task)
    st = task.stats
    if st is None:
        return str(task.phase or task.state)
    parts = [
        f"{format_size(st.transferred)} sent",
        f"{format_size(st.remaining)} left",
        f"{st.mbps / 8:.0f} MB/s",
        f"dirty {format_size(st.dirty_pages_rate * st.page_size)}/s",
    ]
    if st.expected_downtime_ms is not None:
        parts.append(f"exp. downtime {st.expected_downtime_ms} ms")
    parts.append(f"pass {st.passes}")
    if st.rung:
        rung = f"rung {st.rung}"
        if st.downtime_limit_ms is not None:
            rung += f" (downtime limit {st.downtime_limit_ms} ms"
            rung += f", throttle {st.throttle_pct}%)" if st.throttle_pct else ")"
        parts.append(rung)
    return " | ".join(parts)


def _prediction_table(p: MigrationPrediction) -> Table:
    table = Table("dry run", "")
    rows: list[tuple[str, object]] = [
        ("vm", f"{p.vm}: {p.source} -> {p.destination}"),
        ("memory / resident", f"{format_size(p.memory_bytes)} / {format_size(p.resident_bytes)}"),
        (
            "guest dirties",
            f"{format_size(int(p.dirty_rate_bps))}/s (hot set {format_size(int(p.hot_set_bytes))}"
            f", sweep {format_size(int(p.sweep_bps))}/s)",
        ),
        ("path", f"{format_size(int(p.bandwidth_bps))}/s ({p.bandwidth_from}), RTT {p.rtt_ms} ms"),
        ("stream", f"{p.streams} TCP stream(s) to {p.migration_address or '-'}"),
        *(("unreachable", u) for u in p.unreachable),
        ("completes", "yes" if p.converges else f"no: {p.why_not}"),
        ("predicted total", f"{p.total_s:.1f} s"),
        ("predicted downtime", f"{p.downtime_ms:.0f} ms (limit {p.max_downtime_ms} ms)"),
        ("measures", ", ".join(p.measures) or "none"),
        ("throttle up to", f"{p.max_throttle_pct}%"),
        ("xbzrle", "yes" if p.xbzrle else "no"),
        ("completion timeout", f"{p.completion_timeout_s:.0f} s"),
    ]
    for label, value in rows:
        table.add_row(*cells(label, value))
    return table


def wait_task(task: TaskOut, get: Callable[[int], TaskOut], show_progress: bool) -> TaskOut:
    """Follow a task to its end, with a progress bar unless told otherwise."""
    if not show_progress:
        while task.state.active:
            time.sleep(0.2)
            task = get(task.id)
        return task
    # The description and the line hold data (names, phases): never read as markup.
    columns = (
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[line]}", markup=False),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        tid = bar.add_task(f"{task.vm} {task.source}->{task.destination}", total=1.0, line="queued")
        while True:
            bar.update(tid, completed=task.progress, line=stats_line(task))
            if not task.state.active:
                break
            time.sleep(0.2)
            task = get(task.id)
    return task


def migration_result(task: TaskOut) -> dict[str, object]:
    """What ``vm migrate --json`` prints: the task's id, state and error, and its report."""
    out: dict[str, object] = {"task": task.id, "state": task.state.value, "error": task.error}
    if task.kind == "cold-migrate":
        out.update(
            vm=task.vm,
            source=task.source,
            destination=task.destination,
            kind=task.kind,
            wall_ms=_wall_ms(task),
            steps=[e.message for e in task.events if e.kind == "phase"],
            warnings=[e.message for e in task.events if e.kind == "warning"],
        )
    elif task.kind == "storage-move":
        out.update(vm=task.vm, host=task.source, kind=task.kind, wall_ms=_wall_ms(task))
        if task.mirror is not None:
            out["mirror"] = task.mirror.model_dump(mode="json")
        out["warnings"] = [e.message for e in task.events if e.kind == "warning"]
    elif task.result is not None:
        out.update(task.result.model_dump(mode="json"))
    else:
        out.update(vm=task.vm, source=task.source, destination=task.destination)
    # Every kind: the whole operation, task started -> ended (a live migration's wall_ms
    # counts from the request, queueing included).
    out["operation_ms"] = _wall_ms(task)
    return out


def _wall_ms(task: TaskOut) -> float | None:
    if task.started_at is None or task.ended_at is None:
        return None
    return round((task.ended_at - task.started_at).total_seconds() * 1000, 1)


def _storage_table(task: TaskOut) -> Table:
    table = Table("", "", title="storage move report", show_header=False)
    m = task.mirror
    rows: list[tuple[str, object]] = [
        ("task", f"{task.id} ({task.state.value})"),
        ("host", task.source),
        ("wall time ms", _wall_ms(task)),
    ]
    if m is not None:
        rows.append(("datastore", m.datastore))
        rows.append(("copy mode at the end", m.copy_mode))
        for d in m.disks:
            rows.append(
                (
                    f"disk {d.index}",
                    f"{d.source.datastore}:{d.source.path} -> {d.target.datastore}:"
                    f"{d.target.path} ({format_size(d.length)})",
                )
            )
        rows += [("removed", r) for r in m.removed]
        rows += [("left behind", r) for r in m.leftovers]
    rows += [("warning", e.message) for e in task.events if e.kind == "warning"]
    for label, value in rows:
        if value is not None:
            table.add_row(*cells(label, value))
    return table


def _cold_table(task: TaskOut) -> Table:
    table = Table("", "", title="cold migration report", show_header=False)
    rows: list[tuple[str, object]] = [
        ("task", f"{task.id} ({task.state.value})"),
        ("source", task.source),
        ("destination", task.destination),
        ("wall time ms", _wall_ms(task)),
    ]
    rows += [("step", e.message) for e in task.events if e.kind == "phase"]
    rows += [("warning", e.message) for e in task.events if e.kind == "warning"]
    for label, value in rows:
        if value is not None:
            table.add_row(*cells(label, value))
    return table


def _report_table(task: TaskOut) -> Table:
    if task.kind == "storage-move":
        return _storage_table(task)
    if task.kind == "cold-migrate":
        return _cold_table(task)
    table = Table("", "", title="migration report", show_header=False)
    r = task.result
    rows: list[tuple[str, object]] = [
        ("task", f"{task.id} ({task.state.value})"),
        ("source", task.source),
        ("destination", task.destination),
    ]
    if r is not None:
        # Each figure names what it covers: a shared-nothing migration's QEMU total is its
        # RAM phase only, after the disks' copy.
        rows += [
            ("disk copy (mirror start -> disks in sync) ms", r.disk_copy_ms),
            ("disk bytes copied", r.disk_bytes),
            ("RAM migration (QEMU: migrate issued -> completed) ms", r.total_ms),
            ("RAM setup (QEMU) ms", r.setup_ms),
            ("downtime (QEMU: source stopped -> resumed) ms", r.downtime_ms),
            ("guest paused (source stop -> destination run) ms", r.guest_paused_ms),
            ("request accepted -> RAM stream started ms", r.orchestration_ms),
            ("slowest step before the stream (task report: all) ms", slowest(r.start_timeline)),
            ("RAM bytes sent", r.bytes),
            ("RAM passes", r.passes),
            ("RAM throughput Mbit/s", r.throughput_mbps),
            ("request accepted -> task end (with queueing) ms", r.wall_ms),
            ("whole operation (task started -> ended) ms", _wall_ms(task)),
        ]
        rows += [("warning", w) for w in r.warnings]
        rows += [(f"left on {lo.host}", f"{lo.what}: {lo.why}") for lo in r.leftovers]
    for label, value in rows:
        if value is not None:
            table.add_row(*cells(label, value))
    return table


@app.command("migrate")
def migrate(
    name: str,
    to: str = typer.Option(None, "--to", help="Destination host."),
    datastore: str = typer.Option(
        None,
        "--datastore",
        help="move every disk to this datastore while the VM runs (Storage vMotion)",
    ),
    disk_format: str = typer.Option(
        None, "--disk-format", help="qcow2 or raw: format of the moved disks (default: kept)"
    ),
    max_downtime_ms: int = typer.Option(None, "--max-downtime-ms"),
    bandwidth: str = typer.Option(None, "--bandwidth", help="e.g. 1gbit or 200M/s"),
    timeout: float = typer.Option(
        None, "--timeout", help="seconds; abort with the VM kept on its source after that"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="measure and predict the migration; start nothing"
    ),
    allow_postcopy: bool = typer.Option(
        False,
        "--allow-postcopy",
        help="when pre-copy cannot converge, let the destination run the VM while its "
        "memory follows (no rollback from then on; a broken link pauses the VM until the "
        "stream is recovered)",
    ),
    force: bool = typer.Option(
        False, "--force", help="migrate even if a must placement rule forbids it"
    ),
    priority: str = typer.Option(
        None,
        "--priority",
        help="high: start before every normal move waiting for the same hosts' slots",
    ),
    json_out: bool = JsonOpt,
    lab: str = LabOpt,
) -> None:
    """Live-migrate a running VM to another host (--to), or move its disks to another
    datastore (--datastore); exit non-zero unless it completed."""
    with errors_exit():
        req = MigrateRequest.model_validate(
            {
                "to": to,
                "datastore": datastore,
                "disk_format": disk_format,
                "max_downtime_ms": max_downtime_ms,
                "bandwidth": bandwidth,
                "timeout_s": timeout,
                "allow_postcopy": allow_postcopy,
                "force": force,
                "priority": priority,
            }
        )
    if dry_run:
        with errors_exit(), server_client(lab) as client:
            prediction = client.plan_migration(name, req)
        if json_out:
            print_json(prediction.model_dump(mode="json"))
        else:
            console.print(_prediction_table(prediction))
        return
    with errors_exit(), server_client(lab) as client:
        task = client.migrate(name, req)
        task = wait_task(task, client.task, show_progress=not json_out)
    if json_out:
        print_json(migration_result(task))
    else:
        console.print(_report_table(task))
        if task.error:
            console.print(Text(task.error, style="red"))
    if task.state != TaskState.SUCCEEDED:
        raise typer.Exit(1)
