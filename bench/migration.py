"""Live-migration benchmark: qmotion against plain QEMU defaults, same lab, same guests, one run.

Baseline ("plain QEMU"): the destination started with ``-incoming``, then ``migrate`` with
QEMU's default parameters (128 MiB/s cap, 300 ms downtime limit) and nothing around the
switchover: what a hand-written script does. qmotion: the full path through the manager.
Each run boots a fresh guest, lets it write its memory, holds a TCP echo session to it from
the client namespace, migrates h1 -> h2 and measures: QEMU's total time and downtime, the guest
pause (source stop -> destination resume), the largest gap in the echo stream (TCP blackout),
and for qmotion the orchestration overhead (request accepted -> migration stream started).

Before the measured runs one unrecorded migration h1 -> h2 gives the manager the path's rate
(as any cluster has it after its first migration between two hosts).

qmotion runs twice per repetition: with the destination started paused (``-S``, the default:
it runs only on the word that the source completed) and with QEMU's own resume at the end of
the stream (``destination_start=auto``), so the cost of the safe start is measured side by
side in the same run.

The stream alone, driven through the agents with qmotion's parameters and nothing around it,
runs in plaintext and in TLS (qmotion's stream count; and, in one scenario, 1 and 4 channels
and zstd-compressed multifd), with the busy CPU seconds of the whole machine over each: TLS's
cost as a ratio to plaintext, and the least time its work needs on this machine's cores.
AES-256-GCM alone over the same bytes (16 KiB records, both ways) gives the floor of any TLS.
qmotion's runs also record accepted -> stream started step by step (the report's
``start_timeline``), tabled as medians.

    python -m bench.migration [--reps N] [--scenario NAME ...] [--method NAME ...]
        [--variants-in SCENARIO] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
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
from qmotion.migration.params import choose, qemu_defaults, streams_for
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


def run_stream(
    lab: Lab, name: str, tls: bool, streams: int | None = None, zstd: bool = False
) -> dict[str, Any]:
    """The stream alone, as qmotion sets it up (no cap, 20 ms downtime limit, its stream
    count for TLS on this LAN), driven through the agents: encrypted against plaintext with
    nothing else different. ``streams``: multifd channels (None: qmotion's choice)."""
    src, dst = lab.agent("h1"), lab.agent("h2")
    spec = VmSpec.model_validate(src.vm(name).spec.model_dump())
    cpus = min(a.host().cpus for a in (src, dst))
    chosen = streams_for(0.0, None, tls=tls, cpus=cpus) if streams is None else streams
    params = choose(None, None).model_copy(
        update={
            "destination_start": "auto",
            "tls": tls,
            "tls_hostname": "h2" if tls else None,
            "multifd_channels": chosen,
            "multifd_compression": "zstd" if zstd and chosen else None,
        }
    )
    inc = dst.incoming(IncomingRequest(spec=spec, params=params, source_host="h1"))
    busy0 = _busy_s()
    stats = src.migrate(name, OutgoingRequest(uri=inc.uri, params=params))
    while not stats.finished:
        stats = src.migration(name, wait_ms=100, known_status=stats.status)
    busy = _busy_s() - busy0  # both QEMUs, their agents, the kernel: the whole machine
    while not stats.total_time_ms:
        time.sleep(0.02)
        stats = src.migration(name)
    assert stats.status == "completed", stats
    src.release(name)
    return {
        "total_ms": stats.total_time_ms,
        "downtime_ms": stats.downtime_ms,
        "streams": max(chosen, 1),
        "bytes": stats.transferred,
        "cpu_s": round(busy, 3),
        # Busy share of all cores over QEMU's total time (1.0: every core busy throughout).
        "cpu_share": round(busy / (os.cpu_count() or 1) / (stats.total_time_ms / 1000), 2),
    }


def aes_alone(nbytes: int) -> float:
    """CPU seconds of AES-256-GCM (TLS 1.3's cipher here) sealing and opening ``nbytes`` in
    16 KiB records (TLS's largest) on this machine: what encryption needs at the least."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, record, nonce = AESGCM(b"k" * 32), os.urandom(16 << 10), b"n" * 12
    sealed = aead.encrypt(nonce, record, None)
    count = max(nbytes // len(record), 1)
    t0 = time.process_time()
    for _ in range(count):
        aead.encrypt(nonce, record, None)
    for _ in range(count):
        aead.decrypt(nonce, sealed, None)
    return time.process_time() - t0


def kernel_crypto() -> dict[str, bool]:
    """Whether this kernel could carry the stream's encryption instead of QEMU: kernel TLS
    (the tls ULP) and ESP's AES-GCM (gcm(aes) in its crypto API)."""
    ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp")
    names = {
        line.split(":", 1)[1].strip()
        for line in Path("/proc/crypto").read_text().splitlines()
        if line.startswith("name")
    }
    return {
        "ktls": ulps.exists() and "tls" in ulps.read_text().split(),
        "gcm_aes": any("gcm(aes)" in n for n in names),
    }


def _busy_s() -> float:
    """CPU seconds the machine has spent busy since boot (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


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
        "start_timeline": [x.model_dump() for x in r.start_timeline],
        "predicted": r.prediction is not None,
        "warnings": r.warnings,
    }


METHODS: list[tuple[str, Any]] = [
    ("plain QEMU", run_baseline),
    ("qmotion", run_qmotion),
    ("qmotion, destination auto", functools.partial(run_qmotion, start="auto")),
    ("stream, plaintext", functools.partial(run_stream, tls=False)),
    ("stream, TLS", functools.partial(run_stream, tls=True)),
    # The options measured beside qmotion's choice (issue 27).
    ("stream, TLS, 1 channel", functools.partial(run_stream, tls=True, streams=1)),
    ("stream, TLS, 4 channels", functools.partial(run_stream, tls=True, streams=4)),
    ("stream, TLS, zstd", functools.partial(run_stream, tls=True, zstd=True)),
]
TLS_VARIANTS = [m for m, _ in METHODS if m.startswith("stream, TLS")]


def _warm_up(lab: Lab) -> None:
    """One migration h1 -> h2 before the measured ones, not recorded: the manager then knows
    the path's rate (its history), as on any cluster after the first migration between two
    hosts, and a measured run starts its stream without probing the path first."""
    name, _ = _boot(lab, Scenario("warm-up", "256M", 0, 0.0), 0)
    try:
        run_qmotion(lab, name)
    finally:
        _cleanup(lab, name)


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
    ap.add_argument("--scenario", action="append", help="only these scenarios (by name)")
    ap.add_argument("--method", action="append", help="only these methods (by name)")
    ap.add_argument(
        "--variants-in",
        default="1 GiB, 600 MiB written",
        help="the scenario the TLS options beside qmotion's choice run in (the rest skip them)",
    )
    args = ap.parse_args()
    methods = [(m, fn) for m, fn in METHODS if not args.method or m in args.method]
    extra = set(TLS_VARIANTS) - {"stream, TLS"}
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    lab = lab_up(LAB, 2)
    rows: list[dict[str, Any]] = []
    n = 0
    try:
        accel = lab.agent("h1").host().accel
        _warm_up(lab)
        pooled = lab.record.hugepages
        for sc in SCENARIOS:
            if args.scenario and sc.name not in args.scenario:
                continue
            if sc.hugepages != pooled:
                for host in ("h1", "h2"):
                    lab.restart_agent(host, hugepages=sc.hugepages)
                pooled = sc.hugepages
            for rep in range(args.reps):
                for method, fn in methods:
                    if method in extra and sc.name != args.variants_in:
                        continue
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
    streamed = [r["bytes"] for r in rows if r["method"] == "stream, plaintext"]
    report = {
        "machine": {
            **machine(),
            "accel": accel.name,
            "accel_reason": accel.reason,
            "kernel_crypto": kernel_crypto(),
        },
        "rows": rows,
        # AES-GCM alone over what the plaintext stream carried (median), both ways; each
        # scenario's row scales it to its own bytes.
        "aes_cpu_s": round(aes_alone(int(statistics.median(streamed))), 3) if streamed else None,
        "aes_bytes": int(statistics.median(streamed)) if streamed else None,
    }
    write_report(args.out, "migration", report, table)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _median(rows: list[dict[str, Any]], sc: str, method: str, key: str) -> float | None:
    """The median of ``key`` over one scenario's runs of one method (None: none has it)."""
    xs = [
        r[key]
        for r in rows
        if r["scenario"] == sc and r["method"] == method and r.get(key) is not None
    ]
    return statistics.median(xs) if xs else None


def _side_by_side(
    rows: list[dict[str, Any]], metrics: list[tuple[str, str]], base: str, other: str
) -> list[str]:
    """Table rows: per scenario and metric, the medians of ``base`` and ``other`` and their
    ratio (other / base)."""

    def median(sc: str, method: str, key: str) -> float | None:
        return _median(rows, sc, method, key)

    out = []
    for sc in SCENARIOS:
        if not any(r["scenario"] == sc.name for r in rows):
            continue
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
        f"Medians of {1 + max(r['rep'] for r in report['rows'])} runs. Guest RAM "
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
    aes = report.get("aes_cpu_s")
    per_byte = aes / report["aes_bytes"] if aes and report.get("aes_bytes") else None
    lines += encryption(report["rows"], m["cores"], per_byte)
    kc = m.get("kernel_crypto")
    if kc is not None:
        lines += [
            "",
            f"This kernel: kernel TLS {'available' if kc['ktls'] else 'absent (no tls ULP)'}, "
            f"AES-GCM for IPsec ESP {'available' if kc['gcm_aes'] else 'absent (no gcm(aes))'}.",
        ]
    lines += ["", *start_steps(report["rows"])]
    ok = all(r["session_survived"] and r["memory_intact"] for r in report["rows"])
    lines.append("")
    lines.append(f"Every run: TCP session survived and guest memory intact: {ok}.")
    return "\n".join(lines) + "\n"


def encryption(rows: list[dict[str, Any]], cores: int, aes_s_per_byte: float | None) -> list[str]:
    """The stream alone, TLS variants against plaintext: time, and the CPU it took;
    ``aes_s_per_byte``: AES-GCM's CPU seconds per byte sealed and opened, measured once."""
    base = "stream, plaintext"
    out = [
        "",
        "Encryption: the stream alone as qmotion sets it up (no cap, 20 ms downtime limit), "
        "TLS (mutual x509, QEMU's tls-creds) against plaintext, same run, medians. CPU: "
        f"busy seconds of the whole machine ({cores} cores) during the stream; floor: that "
        "work spread over every core, against plaintext's time.",
        "",
        "| guest | stream | total ms | ratio | CPU s | cores busy | CPU floor ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    def med(sc: str, method: str, key: str) -> float | None:
        return _median(rows, sc, method, key)

    for sc in SCENARIOS:
        plain = med(sc.name, base, "total_ms")
        if plain is None:
            continue
        for method in [base, *TLS_VARIANTS]:
            total, cpu = med(sc.name, method, "total_ms"), med(sc.name, method, "cpu_s")
            if total is None:
                continue
            share = med(sc.name, method, "cpu_share")
            floor = f"{cpu / cores * 1000 / plain:.2f}" if cpu is not None else "-"
            streams = med(sc.name, method, "streams")
            label = f"{method.removeprefix('stream, ')} ({streams:.0f} TCP)" if streams else method
            out.append(
                f"| {sc.name} | {label} | {total:.0f} | {total / plain:.2f} | "
                f"{_fmt2(cpu)} | {_fmt2(share)} | {floor} |"
            )
        plain_cpu, plain_bytes = med(sc.name, base, "cpu_s"), med(sc.name, base, "bytes")
        if aes_s_per_byte is not None and plain_cpu is not None and plain_bytes is not None:
            # A TLS with no cost but the cipher: plaintext's work plus AES-GCM both ways.
            least = plain_cpu + aes_s_per_byte * plain_bytes
            out.append(
                f"| {sc.name} | plaintext + AES-256-GCM alone, 16 KiB records (no TLS "
                f"overhead) | - | - | {least:.2f} | - | {least / cores * 1000 / plain:.2f} |"
            )
    return out


def _fmt2(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def start_steps(rows: list[dict[str, Any]]) -> list[str]:
    """Accepted -> stream started, step by step: the median of each step over qmotion's runs
    (steps overlap: measuring runs beside preparing the destination)."""
    runs = [r["start_timeline"] for r in rows if r.get("start_timeline")]
    if not runs:
        return []
    steps: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for x in run:
            steps.setdefault(x["step"], []).append((x["start_ms"], x["ms"]))
    out = [
        f"Accepted -> stream started, step by step: medians over {len(runs)} qmotion runs "
        "(ms since the request was accepted; the agents' own steps indented).",
        "",
        "| step | starts at ms | takes ms |",
        "|---|---|---|",
    ]
    order = sorted(steps, key=lambda k: statistics.median(a for a, _ in steps[k]))
    for k in order:
        starts = statistics.median(a for a, _ in steps[k])
        took = statistics.median(b for _, b in steps[k])
        label = f"&nbsp;&nbsp;{k}" if ": " in k else k
        out.append(f"| {label} | {starts:.0f} | {took:.0f} |")
    return out


if __name__ == "__main__":
    main()
