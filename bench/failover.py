"""Failover, measured: the manager replica running a live migration is SIGKILLed mid-copy.

    python -m bench.failover [--out bench/results] [--runs 3] [--lease 10]

One 2-host lab on a PostgreSQL the lab starts, with two manager replicas (m1, m2) and the
given lease. Each run: a guest of 512 MiB with 300 MiB written, still writing 2 MiB/s, is
migrated h1 -> h2 through m1 at 30 MiB/s (so the copy is under way for about 10 s); as soon
as its task is in the copy (phase ``monitor``) m1 is SIGKILLed (and started again after the
run, so the next one has two replicas). Measured from the kill: the takeover (the event
"taken over by replica m2 from m1") and the migration's end; checked: it succeeded, the VM is
on h2 by the API, one copy runs (h1's agent no longer has it), the guest's memory checker is
intact and it did not reboot. The baseline in the same
run: the same migration with no kill. Targets (issue 26): takeover within 2 leases, and at
most 25 s with a lease of 10 s.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import write_report
from bench.migration import machine
from qmotion.api.server import MigrateRequest, TaskOut, TaskState, VmCreate, Workload
from qmotion.api.vm import VmState
from qmotion.client.server import ServerClient
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.lab.processes import start_manager
from qmotion.probe.guest import mem_check, mem_status, wait_echo

LAB = "qmfail"
TAKEOVER_TARGET_S = 25.0


def _client(lab: Lab, *urls: str) -> ServerClient:
    rec = lab.record
    assert rec.manager_token_file is not None
    token = Path(rec.manager_token_file).read_text().strip()
    return ServerClient(",".join(urls), token, timeout_s=60, ca_file=rec.manager_ca_file)


def _wait(c: ServerClient, task: TaskOut, timeout_s: float = 300) -> TaskOut:
    deadline = time.monotonic() + timeout_s
    while task.state.active:
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task.id} still {task.state}")
        time.sleep(0.1)
        task = c.task(task.id)
    return task


def _vm(lab: Lab, c: ServerClient, name: str) -> tuple[str, str]:
    vm = c.create_vm(
        VmCreate.model_validate(
            {
                "name": name,
                "host": "h1",
                "memory": "512M",
                "start": True,
                "workload": Workload(fill_mib=300, dirty_mib_s=2),
            }
        )
    )
    assert vm.address is not None
    ip = vm.address.split("/")[0]
    ns = lab.record.client_namespace
    run_in(ns, lambda: wait_echo(ip, 90))
    assert run_in(ns, lambda: mem_check(ip))["consistent"]
    return ip, run_in(ns, lambda: mem_status(ip))["boot_id"]


def _one(lab: Lab, run: int, kill: bool) -> dict[str, Any]:
    rec = lab.record
    assert rec.manager_url is not None
    urls = [rec.manager_url, *(r.url for r in rec.replicas)]
    name = f"f{run}{'k' if kill else 'b'}"
    with _client(lab, *urls) as c:
        ip, boot = _vm(lab, c, name)
        started = time.monotonic()
        task = c.migrate(name, MigrateRequest(to="h2", bandwidth="30M/s"))
        while c.task(task.id).phase != "monitor":
            time.sleep(0.05)
        killed_at, killed = datetime.now(UTC), time.monotonic()
        if kill:
            lab.kill_replica("m1")
        done = _wait(c, task)
        ended = time.monotonic()
        events = c.task(task.id).events
        takeover = [e for e in events if "taken over by replica" in e.message]
        row: dict[str, Any] = {
            "killed": kill,
            "state": done.state.value,
            "total_s": round(ended - started, 2),
            "after_kill_s": round(ended - killed, 2),
            "takeover_s": round((takeover[0].at - killed_at).total_seconds(), 2)
            if takeover
            else None,
            "host": c.vm(name).host,
        }
        ns = rec.client_namespace
        after = run_in(ns, lambda: mem_check(ip))
        row["memory_intact"] = bool(after["consistent"]) and after["boot_id"] == boot
        row["copies"] = [
            h for h in ("h1", "h2") if name in [v.name for v in lab.agent(h).list_vms()]
        ]
        row["running_on_h2"] = lab.agent("h2").vm(name).state == VmState.RUNNING
        row["ok"] = (
            done.state == TaskState.SUCCEEDED
            and row["host"] == "h2"
            and row["copies"] == ["h2"]
            and row["memory_intact"]
            and (not kill or bool(takeover))
        )
        c.delete_vm(name, force=True)
    if kill:
        start_manager(rec, register=False)  # m1 back, for the next run
    return row


def _table(report: dict[str, Any]) -> str:
    m, lease = report["machine"], report["lease_s"]
    lines = [
        f"Failover of a live migration: {m['cpu']}, {m['cores']} cores, QEMU {m['qemu']}, "
        f"{report['accel']}, {m['date']}; PostgreSQL {report['postgres']}, two replicas, "
        f"lease {lease:g} s.",
        "",
        "| run | manager killed | state | takeover after kill | end after kill | total "
        "| copies | memory intact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["runs"], 1):
        take = f"{r['takeover_s']} s" if r["takeover_s"] is not None else "-"
        lines.append(
            f"| {i} | {'m1 (SIGKILL)' if r['killed'] else 'none (baseline)'} | {r['state']} "
            f"| {take} | {r['after_kill_s']} s | {r['total_s']} s | {', '.join(r['copies'])} "
            f"| {r['memory_intact']} |"
        )
    worst = report["worst_takeover_s"]
    lines += [
        "",
        f"Worst takeover {worst} s = {worst / lease:.2f} leases (target: within 2 leases, and "
        f"<= {TAKEOVER_TARGET_S:g} s with a lease of 10 s): "
        f"{'met' if report['met'] else 'NOT met'}. Every run ended with one copy on h2 and "
        f"the guest intact: {report['all_ok']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lease", type=float, default=10.0)
    args = ap.parse_args()
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    lab = lab_up(LAB, 2, postgres_db=True, managers=2, lease_s=args.lease)
    try:
        runs = [_one(lab, 0, kill=False)]
        runs += [_one(lab, i, kill=True) for i in range(1, args.runs + 1)]
        takeovers = [r["takeover_s"] for r in runs if r["killed"]]
        worst = max(t if t is not None else float("inf") for t in takeovers)
        from qmotion.lab.postgres import bindir

        report = {
            "machine": machine(),
            "accel": lab.agent("h1").host().accel.name,
            "postgres": bindir().parent.name,
            "lease_s": args.lease,
            "runs": runs,
            "worst_takeover_s": worst,
            "met": worst <= 2 * args.lease and (args.lease != 10.0 or worst <= TAKEOVER_TARGET_S),
            "all_ok": all(r["ok"] for r in runs),
        }
        write_report(Path(args.out), "failover", report, _table)
    finally:
        lab_down(LAB)


if __name__ == "__main__":
    main()
