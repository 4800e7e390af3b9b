"""Storage vMotion benchmark: a running guest's disk moved, against ``qemu-img convert``.

    python -m bench.storage [--reps N] [--no-live] [--out bench/results]

One 2-host lab. The disk: 2 GiB qcow2 on the shared datastore with 1 GiB written (its second
half, as the guest's bulk writer uses it; the checked records live in the first half). Each
row moves it to ``local-h1`` (the same file system, so the copy, not the medium, is compared):

- ``qemu-img convert -O qcow2`` of the same image to the same datastore (no VM): the baseline
  throughput (allocated bytes / seconds) and the allocation a plain copy gives;
- ``vm migrate --datastore local-h1`` with the guest idle (its record writer only: 20
  O_DSYNC 4 KiB records/s);
- the same with the guest also writing 20 MiB/s (1 MiB direct writes over the written half);
- the idle move again with a TCP echo session to the guest (a request every 5 ms) through it,
  and first for 3 s with nothing moving: the guest's longest service gap during the copy and
  at the switch (in sync -> done), against its gap with nothing moving (issue 27).

Each row: total seconds (the task's wall time: copy, pivot, removal of the old file), copy
seconds (until every disk is in sync; the convert's includes its sync to disk), throughput
(source allocation / copy seconds), target allocation / source allocation, copy mode at the
end, and the record check (every acknowledged record present and intact). Targets (issue 11):
idle >= 0.8x convert throughput, writing <= 1.5x the idle time, allocation <= 1.1x, 0 lost
records.

Shared-nothing (one run each): a 1 GiB guest with 600 MiB of its memory written and the same
prepared disk on ``local-h1``, moved live to h2 and ``local-h2`` (``vm migrate --to h2
--datastore local-h2``) while a TCP echo session runs from the client namespace; beside it the
same guest on the shared datastore moved by an ordinary live migration (RAM only), the
baseline for what copying the disk adds. Each: total seconds, disk copy seconds (mirror start
to in sync), QEMU's RAM migration time and downtime, the guest's pause (source stop to
destination resume), the largest gap in the echo stream (TCP blackout), lost records, memory
check. Targets: downtime <= 30 ms, TCP blackout <= 100 ms, 0 lost records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, cast

from bench import write_report
from bench.migration import _with_stream, machine
from qmotion.api.server import DiskCreate, MigrateRequest, TaskOut, TaskState, VmCreate, Workload
from qmotion.client.errors import ClientError
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.probe.guest import disk_status, disk_verify, mem_check, wait_echo

LAB = "qmstor"
MiB = 1 << 20
DISK_MIB = 2048
WRITTEN_MIB = 1024


def _ds(lab: Lab, name: str) -> Path:
    return Path(next(d.path for d in lab.record.datastores if d.name == name))


def _allocated(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out)["actual-size"])


def _drop_caches() -> None:
    """Each row starts from a cold page cache (none reads the source from memory)."""
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _prepare(path: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{DISK_MIB}M"], check=True
    )
    half = DISK_MIB // 2
    subprocess.run(
        ["qemu-io", "-c", f"write -P 0x5a {half}M {WRITTEN_MIB}M", str(path)],
        check=True,
        capture_output=True,
    )


def _timed_convert(lab: Lab, image: Path, name: str) -> tuple[float, int]:
    """``qemu-img convert`` of the image to local-h1, synced, from a cold page cache: its
    seconds and the copy's allocated bytes."""
    target = _ds(lab, "local-h1") / name
    target.unlink(missing_ok=True)
    _drop_caches()
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(target)], check=True)
    subprocess.run(["sync", str(target)], check=False)
    seconds = time.monotonic() - t0
    copy = _allocated(target)
    target.unlink()
    return seconds, copy


def _convert(lab: Lab, image: Path) -> dict[str, Any]:
    seconds, copy = _timed_convert(lab, image, "convert-baseline.qcow2")
    source = _allocated(image)
    return {
        "name": "qemu-img convert (baseline)",
        "seconds": round(seconds, 2),
        "throughput_mib_s": round(source / MiB / seconds, 1),
        "allocation_ratio": round(copy / source, 3),
        "copy_seconds": round(seconds, 2),
        "copy_mode": None,
        "lost_records": None,
        "ok": True,
    }


def _host_copy(lab: Lab, image: Path) -> float:
    """The baseline's copy again, beside the running guest (the move's conditions): s."""
    return _timed_convert(lab, image, "host-copy.qcow2")[0]


def _move(lab: Lab, image: Path, n: int, disk_mib_s: float, stream: bool = False) -> dict[str, Any]:
    """One same-host move shared -> local-h1. ``stream``: a TCP echo session runs through
    it, and first as long with nothing moving (the gap the guest shows anyway, under TCG)."""
    name = f"s{n}"
    with lab.server() as server:
        vm = server.create_vm(
            VmCreate(
                name=name,
                host="h1",
                memory="256M",
                workload=Workload(fill_mib=16, disk_mib_s=disk_mib_s),
                disk=DiskCreate(datastore="shared", size_mib=DISK_MIB),
            )
        )
        disk = _ds(lab, "shared") / vm.disks[0].path
        shutil.copyfile(image, disk)  # the prepared image, before the VM first opens it
        source_alloc = _allocated(disk)
        server.start_vm(name)
        assert vm.address
        ip = vm.address.split("/")[0]
        ns = lab.record.client_namespace
        run_in(ns, lambda: wait_echo(ip, 180))
        assert run_in(ns, lambda: mem_check(ip))["consistent"]
        time.sleep(3)  # the bulk writer under way
        _drop_caches()
        gaps: dict[str, float] = {}
        host_copy_s: float
        if stream:
            gaps["quiet"] = _with_stream(lab, ip, lambda: time.sleep(3.0))[1].max_gap_ms
            # The same bytes copied by the host, not by this guest's QEMU: what a copy of
            # this size costs the guest's service on these cores, whoever copies.
            took, copying = _with_stream(lab, ip, lambda: _host_copy(lab, image))
            gaps["host_copy"], host_copy_s = copying.max_gap_ms, cast(float, took)
        else:
            host_copy_s = _host_copy(lab, image)
        _drop_caches()  # the move reads the disk as the copy beside it did: from the device
        before = run_in(ns, lambda: disk_status(ip))
        t0 = time.monotonic()

        def move() -> TaskOut:
            task = server.migrate(name, MigrateRequest(datastore="local-h1"))
            while task.state.active:
                time.sleep(0.2)
                task = server.task(task.id)
            return task

        if stream:
            moved, during = _with_stream(lab, ip, move)
            task = cast(TaskOut, moved)
            gaps["move"] = during.max_gap_ms
            # When it came, from the request (the copy's end and the switch are in the row).
            worst = max(during.gaps, key=lambda x: x[1], default=None)
            if worst is not None:
                gaps["at_s"] = round(worst[0] - worst[1] / 1000 - t0, 3)
            # The switch alone: from the mirror in sync (write-blocking) to the task's end.
            synced_at = next((e.at for e in task.events if e.message.startswith("in sync")), None)
            if synced_at is not None and task.started_at and task.ended_at:
                start = t0 + (synced_at - task.started_at).total_seconds() - 0.1
                end = t0 + (task.ended_at - task.started_at).total_seconds() + 0.3
                gaps["switch"] = during.max_gap_between(start, end)
        else:
            task = move()
        assert task.started_at is not None and task.ended_at is not None
        seconds = (task.ended_at - task.started_at).total_seconds()
        # The copy: from the task's start to every disk in sync (then the pivot and the
        # removal of the old file follow).
        synced = next((e.at for e in task.events if e.message.startswith("in sync")), None)
        copy_s = (synced - task.started_at).total_seconds() if synced else seconds
        after = run_in(ns, lambda: disk_status(ip))
        wrote = (int(after["bulk_bytes"]) - int(before["bulk_bytes"])) / (time.monotonic() - t0)
        verdict = run_in(ns, lambda: disk_verify(ip))
        shown = server.vm(name)
        target = _ds(lab, "local-h1") / shown.disks[0].path
        row = {
            "name": f"qmotion storage move, guest writing {disk_mib_s:g} MiB/s"
            if disk_mib_s
            else "qmotion storage move, guest idle"
            + (", TCP echo session running" if stream else ""),
            "quiet_gap_ms": gaps.get("quiet"),
            "host_copy_gap_ms": gaps.get("host_copy"),
            "host_copy_mib_s": round(source_alloc / MiB / host_copy_s, 1),
            "service_gap_ms": gaps.get("move"),
            "service_gap_at_s": gaps.get("at_s"),
            "switch_gap_ms": gaps.get("switch"),
            "seconds": round(seconds, 2),
            "copy_seconds": round(copy_s, 2),
            "throughput_mib_s": round(source_alloc / MiB / copy_s, 1),
            "allocation_ratio": round(_allocated(target) / source_alloc, 3)
            if target.exists()
            else None,
            "copy_mode": task.mirror.copy_mode if task.mirror else None,
            "lost_records": verdict.get("lost"),
            "guest_wrote_mib_s": round(wrote / MiB, 1),
            "records_checked": verdict.get("checked"),
            "ok": task.state == TaskState.SUCCEEDED and verdict.get("intact") is True,
            "error": task.error,
            "events": [e.message for e in task.events],
            "event_at_s": [round((e.at - task.started_at).total_seconds(), 3) for e in task.events],
        }
        with contextlib.suppress(ClientError):
            server.delete_vm(name, force=True)
        target.unlink(missing_ok=True)
        return row


def _live(lab: Lab, image: Path, n: int, copy: bool) -> dict[str, Any]:
    """One live migration h1 -> h2 of a 1 GiB guest (600 MiB written) with the prepared disk:
    shared-nothing (``copy``: local-h1 -> local-h2) or RAM only (on ``shared``)."""
    name = f"n{n}"
    source_ds = "local-h1" if copy else "shared"
    with lab.server() as server:
        vm = server.create_vm(
            VmCreate(
                name=name,
                host="h1",
                memory="1G",
                workload=Workload(fill_mib=600),
                disk=DiskCreate(datastore=source_ds, size_mib=DISK_MIB),
            )
        )
        disk = _ds(lab, source_ds) / vm.disks[0].path
        shutil.copyfile(image, disk)
        source_alloc = _allocated(disk)
        server.start_vm(name)
        assert vm.address
        ip = vm.address.split("/")[0]
        ns = lab.record.client_namespace
        run_in(ns, lambda: wait_echo(ip, 180))
        assert run_in(ns, lambda: mem_check(ip))["consistent"]  # waits for the fill
        _drop_caches()
        req = MigrateRequest(to="h2", datastore="local-h2" if copy else None)

        def migrate() -> dict[str, Any]:
            task = server.migrate(name, req)
            while task.state.active:
                time.sleep(0.2)
                task = server.task(task.id)
            return {"task": task}

        out, stream = _with_stream(lab, ip, migrate)
        task = out["task"]
        verdict = run_in(ns, lambda: disk_verify(ip))
        memory_ok = bool(run_in(ns, lambda: mem_check(ip))["consistent"])
        shown = server.vm(name)
        target = _ds(lab, shown.disks[0].datastore) / shown.disks[0].path
        r = task.result
        row = {
            "name": "qmotion shared-nothing (disk + RAM)" if copy else "qmotion live, RAM only",
            "seconds": round(r.wall_ms / 1000, 2) if r else None,
            "disk_copy_seconds": round(r.disk_copy_ms / 1000, 2)
            if r and r.disk_copy_ms is not None
            else None,
            "ram_seconds": round(r.total_ms / 1000, 2) if r and r.total_ms else None,
            "downtime_ms": r.downtime_ms if r else None,
            "guest_paused_ms": r.guest_paused_ms if r else None,
            "blackout_ms": round(stream.max_gap_ms, 1),
            "guest_frame_ms": r.guest_frame_ms if r else None,
            "client_frame_ms": r.client_frame_ms if r else None,
            "allocation_ratio": round(_allocated(target) / source_alloc, 3)
            if copy and target.exists()
            else None,
            "lost_records": verdict.get("lost"),
            "records_checked": verdict.get("checked"),
            "memory_ok": memory_ok,
            "ok": task.state == TaskState.SUCCEEDED
            and verdict.get("intact") is True
            and memory_ok
            and shown.host == "h2",
            "error": task.error,
            "events": [e.message for e in task.events],
        }
        with contextlib.suppress(ClientError):
            server.delete_vm(name, force=True)
        target.unlink(missing_ok=True)
        return row


def _table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Storage vMotion, {m['date']}, {m['cpu']} ({m['cores']} cores), QEMU {m['qemu']}, "
        f"accelerator {report['accel']}: {DISK_MIB} MiB qcow2 with {WRITTEN_MIB} MiB written, "
        "shared -> local-h1 (same file system), page cache dropped before each row; "
        f"median of {report['reps']} runs by copy time.",
        "",
        "| run | total s | copy s | copy MiB/s | vs convert | vs convert beside the guest | "
        "target/source allocation | "
        "copy mode at the end | guest wrote MiB/s (during the move) | lost records |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["rows"][0]["throughput_mib_s"]
    for r in report["rows"]:
        ratio = f"{r['throughput_mib_s'] / base:.2f}x" if base else "-"
        beside = r.get("host_copy_mib_s")
        near = f"{r['throughput_mib_s'] / beside:.2f}x ({beside})" if beside else "-"
        lines.append(
            f"| {r['name']} | {r['seconds']} | {r['copy_seconds']} | {r['throughput_mib_s']} | "
            f"{ratio} | {near} | "
            f"{r['allocation_ratio']} | {r['copy_mode'] or '-'} | "
            f"{r.get('guest_wrote_mib_s', '-')} | "
            f"{'-' if r['lost_records'] is None else r['lost_records']} |"
        )
    idle, busy = report["rows"][1], report["rows"][2]
    lines += [
        "",
        f"Writing 20 MiB/s took {busy['seconds'] / idle['seconds']:.2f}x the idle move "
        "(target <= 1.5x).",
        "",
    ]
    echo = [r for r in report["rows"] if r.get("service_gap_ms") is not None]
    if echo:
        lines += [
            "The guest's service during a same-host move: the longest gap in a TCP echo "
            "session (a request every 5 ms) through the move, against the same session for "
            "3 s with nothing moving, and while the host copies the same image with "
            "`qemu-img convert` (the guest's QEMU copies nothing: what a copy costs the "
            "guest's service on these cores, whoever copies). Same VM, same run; median run.",
            "",
            "| run | nothing moving ms | host copying ms | the move: longest ms | at s | "
            "at the switch (in sync to done) ms | move / host copying |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in echo:
            q, g, sw = r["quiet_gap_ms"], r["service_gap_ms"], r.get("switch_gap_ms")
            hc = r.get("host_copy_gap_ms")
            ratio = f"{g / hc:.2f}" if hc else "-"
            lines.append(
                f"| {r['name']} | {q:.0f} | {'-' if hc is None else f'{hc:.0f}'} | {g:.0f} | "
                f"{r.get('service_gap_at_s')} | {'-' if sw is None else f'{sw:.0f}'} | {ratio} |"
            )
        lines.append("")
    live = report.get("live") or []
    if live:
        lines += [
            "Shared-nothing live migration h1 -> h2 (local-h1 -> local-h2), 1 GiB guest with "
            f"600 MiB written, the same {DISK_MIB} MiB disk ({WRITTEN_MIB} MiB written), TCP "
            "echo session running; beside it the same guest on shared storage (RAM only). "
            "One run each.",
            "",
            "| run | total s | disk copy s | RAM s | QEMU downtime ms | guest paused ms | "
            "TCP blackout ms | target/source allocation | lost records | memory intact |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in live:
            lines.append(
                f"| {r['name']} | {r['seconds']} | {r['disk_copy_seconds'] or '-'} | "
                f"{r['ram_seconds']} | {r['downtime_ms']} | {r['guest_paused_ms']} | "
                f"{r['blackout_ms']} | {r['allocation_ratio'] or '-'} | "
                f"{'-' if r['lost_records'] is None else r['lost_records']} | "
                f"{'yes' if r['memory_ok'] else 'NO'} |"
            )
        lines += ["", "Targets: downtime <= 30 ms, TCP blackout <= 100 ms, 0 lost records.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-live", action="store_true", help="only the same-host rows")
    args = ap.parse_args()
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    lab = lab_up(LAB, 2)
    try:
        accel = lab.agent("h1").host().accel.name
        image = Path(lab.record.dir) / "prepared.qcow2"
        _prepare(image)
        runs: list[list[dict[str, Any]]] = [[], [], [], []]
        for rep in range(args.reps):
            runs[0].append(_convert(lab, image))
            runs[1].append(_move(lab, image, 10 * rep + 1, 0.0))
            runs[2].append(_move(lab, image, 10 * rep + 2, 20.0))
            runs[3].append(_move(lab, image, 10 * rep + 3, 0.0, stream=True))
        # Each row is the run with the median copy time (absolute times vary run to run).
        rows = [sorted(r, key=lambda x: float(x["copy_seconds"]))[len(r) // 2] for r in runs]
        live = (
            []
            if args.no_live
            else [_live(lab, image, 100, copy=False), _live(lab, image, 101, copy=True)]
        )
        report = {
            "machine": machine(),
            "accel": accel,
            "reps": args.reps,
            "rows": rows,
            "runs": runs,
            "live": live,
        }
        write_report(args.out, "storage", report, _table)
    finally:
        lab_down(LAB)


if __name__ == "__main__":
    main()
