"""DRS on a live lab: time from measured imbalance to balance, and a maintenance evacuation.

    python -m bench.drs_live [--out bench/results] [--interval 30] [--link 400mbit]

One 3-host lab (each host offers the lab's share of the machine: ``lab up`` defaults), its
migration network shaped to ``--link``.

Balance: 9 test guests, 3 per host, so memory is evenly allocated; the 3 on h1 keep 40% of a
vCPU busy (``--workload cpu=40%``), the others idle, so only the measured CPU demand is
skewed. A tenth guest on h1, the writer, keeps 60% of a vCPU busy and rewrites its memory at
twice what the link carries: by the load the best move, but one that would converge only
with the guest throttled. DRS learns the links from one migration of an idle guest around the
three hosts. With samples in, automation turns ``full`` (threshold 3, the given interval, a
cool-down longer than the run): the row is the time from then until the four busy guests are
on all three hosts, the DRS migrations made, whether any VM moved twice, whether the writer stayed
(and the reason DRS gives), and the imbalance DRS measures before and after. Targets (issues
12 and 23): balanced within 2 DRS intervals, no VM moved twice, the writer never moved.

Maintenance: 6 guests on h3 (five of 256 MiB, one of 512 MiB with 256 MiB written); the
baseline is one live migration of the largest alone (h3 -> h1 and back, the mean); then
``host maintenance enter h3 --wait``: time to empty, VMs per remaining host, and every
guest's memory check. Target: under 3x the time of one migration of the largest VM.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from bench import write_report
from bench.migration import machine
from qmotion.api.server import MigrateRequest, TaskOut, VmCreate, Workload
from qmotion.api.sizes import parse_rate_bytes
from qmotion.client.server import ServerClient
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.probe.guest import mem_check, wait_echo

LAB = "qmdrs"


def _create(server: ServerClient, name: str, host: str, memory: str, wl: Workload) -> None:
    server.create_vm(
        VmCreate.model_validate(
            {"name": name, "host": host, "memory": memory, "start": True, "workload": wl}
        )
    )


def _healthy(lab: Lab, server: ServerClient, names: list[str]) -> bool:
    def check(ip: str) -> bool:
        wait_echo(ip, 120)
        return bool(mem_check(ip)["consistent"])

    ok = True
    for name in names:
        address = server.vm(name).address
        assert address is not None
        ip = address.split("/")[0]
        ok = run_in(lab.record.client_namespace, lambda: check(ip)) and ok  # noqa: B023
    return ok


def _wait(server: ServerClient, task: TaskOut, timeout_s: float = 600) -> TaskOut:
    deadline = time.monotonic() + timeout_s
    while task.state.active and time.monotonic() < deadline:
        time.sleep(0.2)
        task = server.task(task.id)
    return task


def _learn_links(server: ServerClient) -> list[float]:
    """One idle guest around the hosts: the migrations DRS learns the links from (Mbit/s)."""
    _create(server, "probe", "h1", "256M", Workload(fill_mib=32))
    rates = []
    for to in ("h2", "h3", "h1"):
        t = _wait(server, server.migrate("probe", MigrateRequest(to=to)))
        assert t.state == "succeeded", t.error
        rates.append(float(t.result.throughput_mbps or 0.0) if t.result else 0.0)
    server.delete_vm("probe", force=True)
    return rates


def _dirty_rate(lab: Lab, vm: str, timeout_s: float) -> float | None:
    """The writer's dirty rate as its agent last measured it (waits for the first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for m in lab.agent("h1").metrics().vms:
            if m.name == vm and m.dirty_rate_mib_s is not None:
                return m.dirty_rate_mib_s
        time.sleep(5)
    return None


def _balance(lab: Lab, server: ServerClient, interval_s: int, link_mib_s: float) -> dict[str, Any]:
    learned = _learn_links(server)
    names = {h: [f"b{h[-1]}{i}" for i in range(3)] for h in ("h1", "h2", "h3")}
    for host, vms in names.items():
        for name in vms:
            load = 40.0 if host == "h1" else 0.0
            _create(server, name, host, "256M", Workload(fill_mib=32, cpu_pct=load))
    writes = round(2 * link_mib_s, 1)
    _create(server, "writer", "h1", "256M", Workload(fill_mib=128, dirty_mib_s=writes, cpu_pct=60))
    everyone = [n for vms in names.values() for n in vms] + ["writer"]
    _healthy(lab, server, everyone)
    # The agents measure dirty rates once a minute: until the writer's is in, DRS would take
    # it for idle (an unmeasured guest counts as writing nothing).
    measured = _dirty_rate(lab, "writer", 180)
    for _ in range(4):  # samples into the manager's window
        time.sleep(2.5)
        server.refresh_hosts()
    before = server.drs_state()
    # What DRS recommends before it acts (automation partial: recommended, not applied):
    # the writer, by the load the best move, is left, and it says why.
    first = server.drs_run()
    left = {x["vm"]: x["reason"] for x in first.left}
    recommended = sorted(r.vm for r in first.recommendations)
    server.set_settings(
        {
            "drs.automation": "full",
            "drs.threshold": "3",
            "drs.interval": f"{interval_s}s",
            "drs.cooldown": "1h",
        }
    )
    began = time.monotonic()
    busy = [*names["h1"], "writer"]  # four busy guests: balanced when on all three hosts
    balanced_s = None
    deadline = began + 4 * interval_s + 120
    while time.monotonic() < deadline:
        time.sleep(2)
        server.refresh_hosts()
        hosts = {v.host for v in server.vms() if v.name in busy}
        active = [t for t in server.tasks() if t.state.active]
        if len(hosts) == 3 and not active:
            balanced_s = time.monotonic() - began
            break
    server.set_settings({"drs.automation": "manual"})
    moves = [
        t for t in server.tasks() if t.kind in ("migrate", "cold-migrate") and t.vm in everyone
    ]
    per_vm: dict[str, int] = {}
    for t in moves:
        if t.state == "succeeded" and t.vm:
            per_vm[t.vm] = per_vm.get(t.vm, 0) + 1
    after = server.drs_state()
    placement = {v.name: v.host for v in server.vms() if v.name in everyone}
    recs = [
        f"{r.vm} {r.source}->{r.target} p{r.priority} {r.state}"
        for r in server.recommendations(all_states=True)
    ]
    healthy = _healthy(lab, server, everyone)
    for name in everyone:
        with contextlib.suppress(Exception):
            server.delete_vm(name, force=True)
    return {
        "busy": busy,
        "vms": len(everyone),
        "interval_s": interval_s,
        "balanced_s": None if balanced_s is None else round(balanced_s, 1),
        "intervals": None if balanced_s is None else round(balanced_s / interval_s, 2),
        "migrations": sum(per_vm.values()),
        "moved_twice": sorted(v for v, n in per_vm.items() if n > 1),
        "writer_dirty_mib_s": writes,
        "writer_measured_mib_s": measured,
        "learned_links_mbps": learned,
        "writer_moved": per_vm.get("writer", 0),
        "writer_host": placement.get("writer"),
        "writer_left_because": left.get("writer"),
        "first_recommended": recommended,
        "imbalance_before": round(before.imbalance, 4),
        "imbalance_after": round(after.imbalance, 4),
        "memory_intact": healthy,
        "placement": placement,
        "recommendations": recs,
        "drs_tasks": [
            f"{t.id} {t.state} {t.error or ''}" for t in server.tasks() if t.kind == "drs-apply"
        ],
    }


def _maintenance(lab: Lab, server: ServerClient) -> dict[str, Any]:
    names = [f"e{i}" for i in range(6)]
    for i, name in enumerate(names):
        big = i == 0
        wl = Workload(fill_mib=256 if big else 32)
        _create(server, name, "h3", "512M" if big else "256M", wl)
    _healthy(lab, server, names)

    def alone(vm: str) -> float:
        """One live migration of ``vm`` alone, there and back: the mean."""
        took = []
        for to in ("h1", "h3"):
            began = time.monotonic()
            t = _wait(server, server.migrate(vm, MigrateRequest(to=to)))
            assert t.state == "succeeded", t.error
            took.append(time.monotonic() - began)
        return sum(took) / len(took)

    one_s, small_s = alone(names[0]), alone(names[1])
    began = time.monotonic()
    out = server.enter_maintenance("h3")
    assert out.task_id is not None
    t = _wait(server, server.task(out.task_id), 1200)
    evac_s = time.monotonic() - began
    where = {v.name: v.host for v in server.vms() if v.name in names}
    spread = {h: list(where.values()).count(h) for h in ("h1", "h2", "h3")}
    healthy = _healthy(lab, server, names)
    server.exit_maintenance("h3")
    for name in names:
        with contextlib.suppress(Exception):
            server.delete_vm(name, force=True)
    return {
        "vms": len(names),
        "outcome": t.state,
        "one_migration_s": round(one_s, 2),
        "one_small_s": round(small_s, 2),
        # The six one after the other: what running them concurrently is measured against.
        "serial_s": round(one_s + 5 * small_s, 2),
        "evacuation_s": round(evac_s, 2),
        "ratio": round(evac_s / one_s, 2),
        "spread": spread,
        "memory_intact": healthy,
    }


def _table(report: dict[str, Any]) -> str:
    m, b, e = report["machine"], report["balance"], report["maintenance"]
    return "\n".join(
        [
            f"Machine: {m['cpu']}, {m['cores']} cores, {report['accel']}, QEMU {m['qemu']}, "
            f"{m['date']}; lab hosts offer {report['host_cpus']} CPU and "
            f"{report['host_memory_mib']} MiB each.",
            "",
            f"| balance (9 VMs, 3 busy on h1; the writer on h1 at {b['writer_dirty_mib_s']} "
            f"MiB/s, measured {b['writer_measured_mib_s']}) | value |",
            "|---|---|",
            f"| link (shaped) / learned by DRS | {report['link']} / "
            f"{', '.join(f'{x:.0f}' for x in b['learned_links_mbps'])} Mbit/s |",
            f"| DRS interval | {b['interval_s']} s |",
            f"| time to balanced | {b['balanced_s']} s ({b['intervals']} intervals) |",
            f"| DRS migrations | {b['migrations']} |",
            f"| VMs moved twice | {', '.join(b['moved_twice']) or 'none'} |",
            f"| writer moved / where after | {b['writer_moved']} times / {b['writer_host']} |",
            f"| first run: recommended / why it left the writer | "
            f"{', '.join(b['first_recommended'])} / {b['writer_left_because']} |",
            f"| imbalance before -> after | {b['imbalance_before']} -> {b['imbalance_after']} |",
            f"| memory intact | {b['memory_intact']} |",
            "",
            "| maintenance (6 VMs on h3) | value |",
            "|---|---|",
            f"| one migration of the largest (512 MiB) | {e['one_migration_s']} s |",
            f"| one migration of a small one (256 MiB) | {e['one_small_s']} s |",
            f"| the six one after the other (sum) | {e['serial_s']} s |",
            f"| evacuation, enter to empty | {e['evacuation_s']} s ({e['ratio']}x the largest; "
            f"{e['evacuation_s'] / e['serial_s']:.2f} of the serial sum) |",
            f"| VMs per host after | {e['spread']} |",
            f"| outcome / memory intact | {e['outcome']} / {e['memory_intact']} |",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--interval", type=int, default=30, help="DRS interval, seconds")
    ap.add_argument("--link", default="400mbit", help="the migration network's shaped rate")
    args = ap.parse_args()
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    link_mib_s = parse_rate_bytes(args.link) / (1 << 20)
    lab = lab_up(LAB, 3, bandwidth=args.link, migration_net=True)
    try:
        with lab.server() as server:
            report = {
                "machine": machine(),
                "accel": lab.agent("h1").host().accel.name,
                "host_cpus": lab.record.host_cpus,
                "host_memory_mib": lab.record.host_memory_mib,
                "link": args.link,
                "balance": _balance(lab, server, args.interval, link_mib_s),
                "maintenance": _maintenance(lab, server),
            }
        from pathlib import Path

        write_report(Path(args.out), "drs_live", report, _table)
    finally:
        lab_down(LAB)


if __name__ == "__main__":
    main()
