"""``qmotion demo``: live migration on a throwaway 3-host lab, with its figures.

A VM with a memory workload, a TCP session held to it from the client namespace, migrated
host 1 -> 2 -> 3; for each hop the total time, QEMU's downtime and the blackout the TCP client
saw; then the session and the guest's memory are checked. Then a real Debian 12 guest, made
from its image with a cloud-init seed, runs a TCP service and moves to another host and its
local datastore (shared-nothing) while a session to that service stays open. The lab is torn
down at the end.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qmotion.api.server import MigrateRequest, TaskState, VmCreate, Workload
from qmotion.cli.common import cells, console, errors_exit, fail
from qmotion.cli.vm import wait_task
from qmotion.probe.guest import StreamResult, echo_stream, mem_check, mem_status, wait_echo

DEMO_LAB = "qmdemo"


def demo(
    memory: str = typer.Option("1G", help="VM memory."),
    fill: str = typer.Option("600M", help="Memory the guest writes at boot."),
    dirty: str = typer.Option("20M/s", help="Rate at which the guest keeps dirtying it."),
    hot: str = typer.Option(
        "0", help="Hot set, e.g. 64M: rewritten with half the dirty rate (0: none)."
    ),
    keep: bool = typer.Option(False, help="Leave the lab up afterwards."),
    debian: bool = typer.Option(
        True, help="Also move a real Debian guest with its disk (shared-nothing)."
    ),
) -> None:
    """Run the live-migration demo on a throwaway 3-host lab."""
    from qmotion.cli.vm import parse_workload
    from qmotion.lab import lab_down, lab_up
    from qmotion.lab.netns import namespaces, run_in

    try:
        workload: Workload = parse_workload(f"fill={fill},dirty={dirty},hot={hot}")
    except ValueError as exc:
        fail(str(exc), 2)
    if any(n.startswith(f"{DEMO_LAB}-") for n in namespaces()):
        lab_down(DEMO_LAB)  # a previous demo's leftovers
    console.print("[bold]qmotion demo[/]: 3-host lab, live migration h1 -> h2 -> h3")
    ok = False
    with errors_exit():
        lab = lab_up(DEMO_LAB, 3)
        try:
            ok = _run(lab, memory, workload, run_in)
            if debian:
                ok = _run_debian(lab, run_in) and ok
        finally:
            if not keep:
                lab_down(DEMO_LAB)
                console.print("lab torn down")
    if not ok:
        raise typer.Exit(1)


def _run(lab: object, memory: str, workload: Workload, run_in: object) -> bool:
    from qmotion.lab.lab import Lab

    assert isinstance(lab, Lab) and callable(run_in)
    client_ns = lab.record.client_namespace
    accel = lab.agent("h1").host().accel
    console.print(Text(f"accelerator: {accel.name} ({accel.reason})"))
    with lab.server() as server:
        vm = server.create_vm(
            VmCreate.model_validate(
                {
                    "name": "demo",
                    "host": "h1",
                    "memory": memory,
                    "workload": workload,
                    "start": True,
                }
            )
        )
        assert vm.address is not None
        ip = vm.address.split("/")[0]
        console.print(
            Text(
                f"VM demo on h1: {vm.address}, MAC {vm.mac}, CPU {vm.cpu_model}; "
                f"writing {workload.fill_mib} MiB, dirtying {workload.dirty_mib_s} MiB/s"
                + (
                    f" ({workload.hot_mib} MiB hot set rewritten with half of it)"
                    if workload.hot_mib
                    else ""
                )
            )
        )
        run_in(client_ns, lambda: wait_echo(ip, 120))
        before = run_in(client_ns, lambda: mem_check(ip))  # waits for the fill to finish
        boot_id = before["boot_id"]

        result: dict[str, StreamResult] = {}
        stop = Path(lab.record.dir) / "demo-stop"
        stream = threading.Thread(
            target=lambda: result.update(
                s=run_in(client_ns, lambda: echo_stream(ip, 600, 0.005, str(stop)))
            )
        )
        stream.start()
        time.sleep(1.0)
        hops = []
        try:
            for dest in ("h2", "h3"):
                t0 = time.monotonic()
                task = server.migrate("demo", MigrateRequest(to=dest))
                task = wait_task(task, server.task, show_progress=True)
                hops.append((task, t0, time.monotonic() + 0.5))
                time.sleep(1.0)
        finally:
            stop.touch()
            stream.join()
        s = result["s"]
        table = Table(
            "hop",
            "status",
            "total ms",
            "QEMU downtime ms",
            "guest paused ms",
            "TCP blackout ms",
            "MiB sent",
            title="live migration of demo",
        )
        for task, t0, t1 in hops:
            r = task.result
            table.add_row(
                *cells(
                    f"{task.source} -> {task.destination}",
                    task.state.value,
                    r.total_ms if r else None,
                    r.downtime_ms if r else None,
                    r.guest_paused_ms if r else None,
                    f"{s.max_gap_between(t0, t1):.0f}",
                    f"{((r.bytes if r else None) or 0) / (1 << 20):.0f}",
                )
            )
        console.print(table)
        # Boot identity first: a rebooted guest would pass a memory check trivially.
        status = run_in(client_ns, lambda: mem_status(ip))
        after = run_in(client_ns, lambda: mem_check(ip))
        final = server.vm("demo")
        checks = {
            "every migration completed": all(t.state == TaskState.SUCCEEDED for t, _, _ in hops),
            f"TCP session survived ({s.received} echoes, none lost)": s.survived,
            f"guest memory intact ({after['pages']} pages checked)": after["consistent"],
            "same guest, never rebooted": status["boot_id"] == boot_id,
            f"VM now on h3 with MAC {final.mac} and {final.address}": final.host == "h3"
            and final.mac == vm.mac
            and final.address == vm.address,
        }
        for text, good in checks.items():
            console.print(("[green]ok[/]   " if good else "[red]FAIL[/] ") + escape(text))
        if s.errors:
            console.print(Text(f"TCP session: {'; '.join(s.errors)}"))
        if not all(checks.values()):
            console.print("console of the VM on its last host:")
            console.print(Text(lab.agent(final.host).console("demo", 4000)))
        return all(checks.values())


def _run_debian(lab: object, run_in: object) -> bool:
    """A Debian 12 guest from its image moves host and datastore while serving a session."""
    from qmotion.api.server import DiskCreate, ImageImport
    from qmotion.image.debian import ECHO_SERVICE, ensure_debian
    from qmotion.lab.lab import Lab

    assert isinstance(lab, Lab) and callable(run_in)
    client_ns = lab.record.client_namespace
    console.print(
        "[bold]real guest[/]: Debian 12 from its image, cloud-init seed, TCP service; "
        "shared-nothing h1:local-h1 -> h2:local-h2"
    )
    image_path = ensure_debian()  # built once from Debian packages (about a minute), cached
    with lab.server() as server:
        image = server.import_image(ImageImport(file=str(image_path), name="debian12"))
        vm = server.create_vm(
            VmCreate(
                name="deb",
                host="h1",
                memory="512M",
                image=image.name,
                disk=DiskCreate(datastore="local-h1", size_mib=3072),
                user_data=ECHO_SERVICE,
                start=True,
            )
        )
        assert vm.address is not None
        ip = vm.address.split("/")[0]
        console.print(Text(f"VM deb on h1 (local-h1): booting {image.name}, {vm.address}"))
        t_boot = time.monotonic()
        run_in(client_ns, lambda: wait_echo(ip, 300))
        console.print(Text(f"its service answers after {time.monotonic() - t_boot:.0f} s"))
        named = "deb login:" in lab.agent("h1").console("deb")
        result: dict[str, StreamResult] = {}
        stop = Path(lab.record.dir) / "demo-deb-stop"
        stream = threading.Thread(
            target=lambda: result.update(
                s=run_in(client_ns, lambda: echo_stream(ip, 600, 0.02, str(stop)))
            )
        )
        stream.start()
        time.sleep(1.0)
        try:
            task = server.migrate("deb", MigrateRequest(to="h2", datastore="local-h2"))
            task = wait_task(task, server.task, show_progress=True)
            time.sleep(1.0)
        finally:
            stop.touch()
            stream.join()
        s, r = result["s"], task.result
        final = server.vm("deb")
        table = Table(
            "move",
            "status",
            "disk copy s",
            "RAM ms",
            "QEMU downtime ms",
            "TCP blackout ms",
            title="shared-nothing live migration of deb",
        )
        table.add_row(
            *cells(
                "h1:local-h1 -> h2:local-h2",
                task.state.value,
                f"{r.disk_copy_ms / 1000:.1f}" if r and r.disk_copy_ms else None,
                r.total_ms if r else None,
                r.downtime_ms if r else None,
                f"{s.max_gap_ms:.0f}",
            )
        )
        console.print(table)
        checks = {
            "migration completed": task.state == TaskState.SUCCEEDED,
            "the guest named itself from its seed (deb)": named,
            f"TCP session to its service survived ({s.received} echoes)": s.survived,
            f"VM now on h2, its disk on {final.disks[0].datastore if final.disks else '-'}": (
                final.host == "h2" and bool(final.disks) and final.disks[0].datastore == "local-h2"
            ),
        }
        for text, good in checks.items():
            console.print(("[green]ok[/]   " if good else "[red]FAIL[/] ") + escape(text))
        if s.errors:
            console.print(Text(f"TCP session: {'; '.join(s.errors)}"))
        if not all(checks.values()):
            console.print(Text(lab.agent(final.host).console("deb", 4000)))
        return all(checks.values())
