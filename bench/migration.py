"""Live-migration benchmark: qmotion against plain QEMU defaults, same lab, same guests, one run.

    python -m bench.migration [--reps N] [--out bench/results]

Baseline ("plain QEMU"): the destination started with ``-incoming``, then ``migrate`` with
QEMU's default parameters (128 MiB/s cap, 300 ms downtime limit) and nothing around the
switchover: what a hand-written script does. qmotion: the full path through the manager.
Each run boots a fresh guest, lets it write its memory, holds a TCP echo session to it from
the client namespace, migrates h1 -> h2 and measures: QEMU's total time and downtime, the guest
pause (source stop -> destination resume), the largest gap in the echo stream (TCP blackout),
and for qmotion the orchestration overhead (request accepted -> migration stream started).

qmotion runs twice per repetition: with the destination started paused (``-S``, the default:
it runs only on the word that the source completed) and with QEMU's own resume at the end of
the stream (``destination_start=auto``), so the cost of the safe start is measured side by
side in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import write_report
from qmotion.agent.facts import cpu_info
from qmotion.api.migration import DestinationStart, IncomingRequest, OutgoingRequest
from qmotion.api.server import MigrateRequest, TaskState, VmCreate, Workload
from qmotion.api.vm import VmSpec
from qmotion.client.errors import ClientError
from qmotion.hypervisor.qemu import qemu_info
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.migration.params import qemu_defaults
from qmotion.probe.guest import StreamResult, echo_stream, mem_check, wait_echo

LAB = "qmbench"


@dataclass(frozen=True)
class Scenario:
    name: str
    memory: str
    fill_mib: int
    dirty_mib_s: float
    # Guest RAM from the hosts' huge-page pool, or ordinary memory (see hypervisor.hugepages).
    hugepages: bool = True


SCENARIOS = [
    Scenario("idle 512 MiB", "512M", 0, 0.0),
    Scenario("1 GiB, 600 MiB written", "1G", 600, 0.0),
    Scenario("1 GiB, 600 MiB written, ordinary memory", "1G", 600, 0.0, hugepages=False),
]


def machine() -> dict[str, Any]:
    cpu, _ = cpu_info()
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "qemu": qemu_info().version,
        "date": datetime.now(UTC).date().isoformat(),
    }


def _boot(lab: Lab, sc: Scenario, n: int) -> tuple[str, str]:
    name = f"b{n}"
    with lab.server() as server:
        vm = server.create_vm(
            VmCreate.model_validate(
                {
                    "name": name,
                    "host": "h1",
                    "memory": sc.memory,
                    "start": True,
                    "workload": Workload(fill_mib=sc.fill_mib, dirty_mib_s=sc.dirty_mib_s),
                }
            )
        )
    assert vm.address
    ip = vm.address.split("/")[0]
    ns = lab.record.client_namespace
    run_in(ns, lambda: wait_echo(ip, 120))
    assert run_in(ns, lambda: mem_check(ip))["consistent"]  # waits for the fill
    return name, ip


def _with_stream(lab: Lab, ip: str, action: Any) -> tuple[dict[str, Any], StreamResult]:
    res: dict[str, StreamResult] = {}
    stop = Path(lab.record.dir) / f"stop-{ip}"
    stop.unlink(missing_ok=True)
    ns = lab.record.client_namespace
    th = threading.Thread(
        target=lambda: res.update(s=run_in(ns, lambda: echo_stream(ip, 300, 0.005, str(stop))))
    )
    th.start()
    time.sleep(1.0)
    try:
        out = action()
        time.sleep(1.0)
    finally:
        stop.touch()
        th.join()
    return out, res["s"]


def run_baseline(lab: Lab, name: str) -> dict[str, Any]:
    """Plain QEMU: incoming + migrate with QEMU's defaults, then the source is ended."""
    src, dst = lab.agent("h1"), lab.agent("h2")
    spec = VmSpec.model_validate(src.vm(name).spec.model_dump())
    # Plain QEMU resumes the destination by itself when the stream completes.
    params = qemu_defaults().model_copy(update={"destination_start": "auto"})
    inc = dst.incoming(IncomingRequest(spec=spec, params=params))
    stats = src.migrate(name, OutgoingRequest(uri=inc.uri, params=params))
    while not stats.finished:
        stats = src.migration(name, wait_ms=500, known_status=stats.status)
    while not stats.total_time_ms:
        time.sleep(0.02)
        stats = src.migration(name)
    assert stats.status == "completed", stats
    dst_events = dict(dst.migration(name).events)
    src.release(name)
    out: dict[str, Any] = {"total_ms": stats.total_time_ms, "downtime_ms": stats.downtime_ms}
    src_events = dict(stats.events)
    if "stopped" in src_events and "resumed" in dst_events:
        out["guest_paused_ms"] = round(dst_events["resumed"] - src_events["stopped"], 1)
    # The manager did not do this one; tell it where the VM is now by moving it back later.
    return out


def run_qmotion(lab: Lab, name: str, start: DestinationStart = "paused") -> dict[str, Any]:
    with lab.server() as server:
        task = server.migrate(name, MigrateRequest(to="h2", destination_start=start))
        while task.state.active:
            time.sleep(0.05)
            task = server.task(task.id)
    assert task.state == TaskState.SUCCEEDED, task.error
    r = task.result
    assert r is not None, task.error
    return {
        "total_ms": r.total_ms,
        "downtime_ms": r.downtime_ms,
        "guest_paused_ms": r.guest_paused_ms,
        "orchestration_ms": r.orchestration_ms,
        "finish_ms": r.finish_ms,
    }


METHODS: list[tuple[str, Any]] = [
    ("plain QEMU", run_baseline),
    ("qmotion", run_qmotion),
    ("qmotion, destination auto", functools.partial(run_qmotion, start="auto")),
]


def _cleanup(lab: Lab, name: str) -> None:
    # After a baseline run the manager still places the VM on h1 (it did not move it): the
    # VM goes from the agent that has it first, then the manager forgets a VM that no host
    # has (its --force), so its memory is not counted against the next runs.
    for host in ("h1", "h2"):
        agent = lab.agent(host)
        if name in [v.name for v in agent.list_vms()]:
            agent.delete(name, force=True)
    with lab.server() as server, contextlib.suppress(ClientError):
        server.delete_vm(name, force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    lab = lab_up(LAB, 2)
    rows: list[dict[str, Any]] = []
    n = 0
    try:
        accel = lab.agent("h1").host().accel
        pooled = lab.record.hugepages
        for sc in SCENARIOS:
            if sc.hugepages != pooled:
                for host in ("h1", "h2"):
                    lab.restart_agent(host, hugepages=sc.hugepages)
                pooled = sc.hugepages
            for rep in range(args.reps):
                for method, fn in METHODS:
                    n += 1
                    name, ip = _boot(lab, sc, n)
                    try:
                        out, stream = _with_stream(lab, ip, functools.partial(fn, lab, name))
                        out["blackout_ms"] = stream.max_gap_ms
                        out["session_survived"] = stream.survived
                        if stream.errors:
                            out["session_errors"] = stream.errors
                        check = run_in(
                            lab.record.client_namespace, functools.partial(mem_check, ip)
                        )
                        out["memory_intact"] = check["consistent"]
                        out["memory_backing"] = lab.agent("h2").vm(name).memory_backing
                    finally:
                        _cleanup(lab, name)
                    rows.append({"scenario": sc.name, "method": method, "rep": rep, **out})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        lab_down(LAB)
    report = {
        "machine": {**machine(), "accel": accel.name, "accel_reason": accel.reason},
        "rows": rows,
    }
    write_report(args.out, "migration", report, table)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _side_by_side(
    rows: list[dict[str, Any]], metrics: list[tuple[str, str]], base: str, other: str
) -> list[str]:
    """Table rows: per scenario and metric, the medians of ``base`` and ``other`` and their
    ratio (other / base)."""

    def median(sc: str, method: str, key: str) -> float | None:
        xs = [
            r[key]
            for r in rows
            if r["scenario"] == sc and r["method"] == method and r.get(key) is not None
        ]
        return statistics.median(xs) if xs else None

    out = []
    for sc in SCENARIOS:
        for key, label in metrics:
            a, b = median(sc.name, base, key), median(sc.name, other, key)
            ratio = f"{b / a:.2f}" if a and b is not None else "-"
            out.append(f"| {sc.name} | {label} | {_fmt(a)} | {_fmt(b)} | {ratio} |")
    return out


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, QEMU {m['qemu']}, "
        f"accelerator {m['accel']}, {m['date']}. "
        f"Medians of {len(report['rows']) // (len(METHODS) * len(SCENARIOS))} runs. Guest RAM "
        "from the "
        "hosts' huge-page pool unless the guest says ordinary memory.",
        "",
        "| guest | metric | plain QEMU | qmotion | ratio |",
        "|---|---|---|---|---|",
    ]
    metrics = [
        ("total_ms", "total time (QEMU) ms"),
        ("downtime_ms", "downtime (QEMU) ms"),
        ("guest_paused_ms", "guest paused ms"),
        ("blackout_ms", "TCP blackout ms"),
        ("orchestration_ms", "accepted -> stream started ms"),
    ]
    lines += _side_by_side(report["rows"], metrics, "plain QEMU", "qmotion")
    lines += [
        "",
        "The destination's start: paused (runs on the source's word, the default) against QEMU's "
        "own resume (auto), same run.",
        "",
        "| guest | metric | auto | paused | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += _side_by_side(report["rows"], metrics[1:4], "qmotion, destination auto", "qmotion")
    ok = all(r["session_survived"] and r["memory_intact"] for r in report["rows"])
    lines.append("")
    lines.append(f"Every run: TCP session survived and guest memory intact: {ok}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
