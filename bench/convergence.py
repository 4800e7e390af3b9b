"""Convergence benchmark: busy guests over a capped link, qmotion against its peers' policies.

    python -m bench.convergence [--link 400mbit] [--cap-s 120] [--out bench/results]
        [--ratios 0,0.5,1,2] [--policies NAME,...] [--shared-link] [--report convergence]

One lab whose host links are shaped to ``--link``, migrating over a network of its own (shaped
alike; ``--shared-link``: over the hosts' only network, where the VM's clients queue behind
the stream); one 1 GiB guest with 600 MiB written per
run, dirtying 0, 0.5x, 1x and 2x what the link carries while it moves. The same QEMU runs every
policy; the peers' are driven through the agents exactly as their code does it (see
../shared/FACTS.md for the sources):

- QEMU defaults: downtime 300 ms, no auto-converge, nothing else; never aborts.
- Proxmox: auto-converge (20 % + 10 %) and xbzrle (cache 10 % of RAM) from the start;
  downtime 100 ms, doubled after more than 5 polls in which the remaining RAM grew.
- Nova: downtime stepped from 50 ms to 500 ms in 10 steps, 75 s apart per GiB; abort after
  800 s per GiB; no auto-converge.
- KubeVirt: QEMU's defaults; abort after 150 s per GiB, or 150 s without progress.
- qmotion: the full path through the manager (measure, predict, ladder).

A run that has not completed after ``--cap-s`` is cancelled by the bench (the source keeps the
VM) and reported as such, with when its own policy would have given up. Each row: completed,
total, QEMU downtime, TCP blackout (largest gap of an echo session held through the move),
seconds the guest ran throttled, memory intact; for qmotion also its ``--dry-run``-equivalent
prediction, to compare with the measured total.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import write_report
from bench.migration import Scenario as Guest
from bench.migration import _boot, _cleanup, _with_stream, machine
from qmotion.api.migration import (
    IncomingRequest,
    MigrationParams,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
)
from qmotion.api.server import MigrateRequest, TaskState
from qmotion.api.sizes import parse_rate_bytes
from qmotion.api.vm import VmSpec
from qmotion.client.agent import AgentClient
from qmotion.lab import Lab, lab_down, lab_up
from qmotion.lab.netns import namespaces, run_in
from qmotion.migration.params import qemu_defaults
from qmotion.probe.guest import mem_check

LAB = "qmconv"
GIB = 1 << 30
RATIOS = (0.0, 0.5, 1.0, 2.0)
POLL_S = 0.5


@dataclass
class Peer:
    """A peer's policy: what it tells QEMU at the start, and what it does on each poll."""

    name: str
    params: MigrationParams
    gives_up_s: float | None  # when the peer itself aborts (None: never)
    state: dict[str, Any] = field(default_factory=dict)

    def poll(self, elapsed: float, st: MigrationStats) -> MigrationTune | str | None:
        return None


class Proxmox(Peer):
    def poll(self, elapsed: float, st: MigrationStats) -> MigrationTune | str | None:
        last = self.state.get("last_remaining")
        self.state["last_remaining"] = st.remaining
        if last is not None and st.remaining > last:
            self.state["grew"] = self.state.get("grew", 0) + 1
        if self.state.get("grew", 0) > 5:
            self.state["grew"] = 0
            self.state["downtime"] = self.state.get("downtime", 100) * 2
            return MigrationTune(downtime_limit_ms=min(self.state["downtime"], 60_000))
        return None


class Nova(Peer):
    def poll(self, elapsed: float, st: MigrationStats) -> MigrationTune | str | None:
        step_s = 75.0 * self.state["gib"]
        step = min(int(elapsed // step_s), 10)
        if step != self.state.get("step", 0):
            self.state["step"] = step
            return MigrationTune(downtime_limit_ms=50 + 45 * step)
        if elapsed > 800 * self.state["gib"]:
            return "completion timeout (800 s/GiB)"
        return None


class KubeVirt(Peer):
    def poll(self, elapsed: float, st: MigrationStats) -> MigrationTune | str | None:
        best = self.state.get("best")
        if best is None or st.remaining < best:
            self.state["best"], self.state["best_at"] = st.remaining, elapsed
        if elapsed > 150 * self.state["gib"]:
            return "completion timeout (150 s/GiB)"
        if elapsed - self.state["best_at"] > 150:
            return "progress timeout (150 s)"
        return None


def peers(memory_bytes: int) -> list[Peer]:
    gib = memory_bytes / GIB
    base = qemu_defaults().model_copy(update={"max_bandwidth": 1 << 40})
    proxmox = base.model_copy(
        update={
            "downtime_limit_ms": 100,
            "auto_converge": True,
            "throttle_initial_pct": 20,
            "throttle_increment_pct": 10,
            "xbzrle_cache_bytes": max(int(memory_bytes * 0.1) >> 20 << 20, 1 << 20),
        }
    )
    nova = base.model_copy(update={"downtime_limit_ms": 50})
    out = [
        Peer("QEMU defaults", qemu_defaults(), None),
        Proxmox("Proxmox", proxmox, None),
        Nova("Nova", nova, 800 * gib),
        KubeVirt("KubeVirt", base, 150 * gib),
    ]
    for p in out:
        p.state["gib"] = gib
    return out


def _settle_and_resume(src: AgentClient, dst: AgentClient, name: str) -> None:
    """After an abort: the source keeps the VM (cancel, wait, resume), the copy is removed."""
    src.cancel_migration(name)
    deadline = time.monotonic() + 60
    while src.migration(name).status not in ("cancelled", "failed", "none"):
        assert time.monotonic() < deadline, "source migration did not settle"
        time.sleep(0.1)
    src.resume(name)
    with contextlib.suppress(Exception):
        dst.delete(name, force=True)


def run_peer(lab: Lab, name: str, peer: Peer, cap_s: float) -> dict[str, Any]:
    src, dst = lab.agent("h1"), lab.agent("h2")
    spec = VmSpec.model_validate(src.vm(name).spec.model_dump())
    inc = dst.incoming(IncomingRequest(spec=spec, params=peer.params))
    st = src.migrate(name, OutgoingRequest(uri=inc.uri, params=peer.params))
    start = time.monotonic()
    throttled = 0.0
    verdict: str | None = None
    while not st.finished:
        time.sleep(POLL_S)
        st = src.migration(name)
        elapsed = time.monotonic() - start
        if st.throttle_pct > 0:
            throttled += POLL_S
        action = peer.poll(elapsed, st)
        if isinstance(action, MigrationTune):
            with contextlib.suppress(Exception):  # the stream may have just finished
                src.tune_migration(name, action)
        elif isinstance(action, str) or elapsed > cap_s:
            verdict = action or f"not complete at the bench's {cap_s:.0f} s cap"
            break
    out: dict[str, Any] = {"throttled_s": throttled, "passes": st.passes}
    if verdict is not None:
        _settle_and_resume(src, dst, name)
        out |= {"completed": False, "how": verdict, "total_ms": None, "downtime_ms": None}
        if peer.gives_up_s is not None and verdict.startswith("not complete"):
            out["how"] += f" ({peer.name} aborts at {peer.gives_up_s:.0f} s)"
        elif peer.gives_up_s is None and verdict.startswith("not complete"):
            out["how"] += f" ({peer.name} never aborts)"
        return out
    while st.status == "completed" and not st.total_time_ms:
        time.sleep(0.02)
        st = src.migration(name)
    if st.status == "completed":
        src.release(name)
        out |= {"completed": True, "total_ms": st.total_time_ms, "downtime_ms": st.downtime_ms}
        out["stopped_at_ms"] = dict(st.events).get("stopped")
    else:
        out |= {"completed": False, "how": f"QEMU {st.status}: {st.error}"}
    return out


def run_qmotion(lab: Lab, name: str, cap_s: float, postcopy: bool = False) -> dict[str, Any]:
    with lab.server() as server:
        req = MigrateRequest(to="h2", timeout_s=cap_s, allow_postcopy=postcopy)
        task = server.migrate(name, req)
        while task.state.active:
            time.sleep(0.2)
            task = server.task(task.id)
    r = task.result
    out: dict[str, Any] = {"completed": task.state == TaskState.SUCCEEDED}
    if r is not None:
        out |= {
            "total_ms": r.total_ms if out["completed"] else None,
            "downtime_ms": r.downtime_ms,
            "throttled_s": r.throttled_s,
            "passes": r.passes,
            "rungs": r.rungs,
            "predicted_s": r.prediction.total_s if r.prediction else None,
            "predicted_converges": r.prediction.converges if r.prediction else None,
            "stopped_at_ms": r.source_stopped_at_ms,
            "postcopy_at_s": r.postcopy_at_s,
            # The switchover from the source's stop (ms): where a blackout goes.
            "timeline": {
                "steered": r.steer_ms,
                "destination_resumed": r.guest_paused_ms,
                "guest_frame": r.guest_frame_ms,
                "client_frame": r.client_frame_ms,
            },
            # The flight recorder's course, for comparing the prediction with what happened.
            "samples": [
                [s.t_s, s.remaining, round(s.dirty_bps), s.throttle_pct, s.passes]
                for s in r.samples
            ],
        }
    if not out["completed"]:
        out["how"] = task.error
    return out


def _vm_host(lab: Lab, name: str) -> str:
    for host in ("h1", "h2"):
        if name in [v.name for v in lab.agent(host).list_vms()]:
            return host
    return "nowhere"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--link", default="400mbit")
    ap.add_argument("--cap-s", type=float, default=120.0)
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument(
        "--policies",
        default="QEMU defaults,Proxmox,Nova,KubeVirt,qmotion,qmotion --allow-postcopy",
    )
    ap.add_argument(
        "--shared-link",
        action="store_true",
        help="migrate over the hosts' only network (default: a separate migration network)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--report", default="convergence", help="NAME of NAME.md/NAME.json")
    args = ap.parse_args()
    link_bps = parse_rate_bytes(args.link)
    wanted = args.policies.split(",")
    if any(n.startswith(f"{LAB}-") for n in namespaces()):
        lab_down(LAB)
    # Plaintext for every policy: the comparison is of convergence, not of encryption.
    # A migration network of its own, as every peer recommends: the VM's clients do not queue
    # behind the stream in the shaped link's buffer (both networks are shaped alike).
    lab = lab_up(LAB, 2, bandwidth=args.link, insecure=True, migration_net=not args.shared_link)
    rows: list[dict[str, Any]] = []
    n = 0
    try:
        accel = lab.agent("h1").host().accel
        for ratio in (float(r) for r in args.ratios.split(",")):
            dirty = round(ratio * link_bps / (1 << 20), 1)
            guest = Guest(f"{ratio}x", "1G", 600, dirty)
            runners: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
                (p.name, functools.partial(run_peer, lab, peer=p, cap_s=args.cap_s))
                for p in peers(GIB)
            ]
            runners.append(("qmotion", functools.partial(run_qmotion, lab, cap_s=args.cap_s)))
            runners.append(
                (
                    "qmotion --allow-postcopy",
                    functools.partial(run_qmotion, lab, cap_s=args.cap_s, postcopy=True),
                )
            )
            for policy, fn in runners:
                if policy not in wanted:
                    continue
                n += 1
                name, ip = _boot(lab, guest, n)
                try:
                    out, stream = _with_stream(lab, ip, functools.partial(fn, name))
                    out["blackout_ms"] = stream.max_gap_ms if out.get("completed") else None
                    # The switchover's own gap: a throttled guest answers slowly all along.
                    stop = out.pop("stopped_at_ms", None)
                    if out.get("completed") and stop is not None:
                        at = stop / 1000  # the agents' monotonic clock is this machine's
                        out["switchover_gap_ms"] = stream.max_gap_between(at - 0.5, at + 3.0)
                    out["session_survived"] = stream.survived
                    check = run_in(lab.record.client_namespace, functools.partial(mem_check, ip))
                    out["memory_intact"] = check["consistent"]
                    out["ends_on"] = _vm_host(lab, name)
                finally:
                    _cleanup(lab, name)
                row = {"ratio": ratio, "dirty_mib_s": dirty, "policy": policy, **out}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        lab_down(LAB)
    report = {
        "machine": {**machine(), "accel": accel.name, "accel_reason": accel.reason},
        "link": args.link,
        "cap_s": args.cap_s,
        "migration_net": not args.shared_link,
        "rows": rows,
    }
    write_report(args.out, args.report, report, table)


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, QEMU {m['qemu']}, "
        f"accelerator {m['accel']}, {m['date']}. Link {report['link']} (shaped in the lab), "
        + (
            "migration on its own network (shaped alike), "
            if report.get("migration_net")
            else "migration sharing the hosts' only network, "
        )
        + f"guest 1 GiB with 600 MiB written, one run per row, bench cap {report['cap_s']:.0f} s.",
        "",
        "| dirty rate | policy | completed | total s | downtime ms | TCP blackout ms "
        "| gap at switchover ms | throttled s | memory intact | predicted s | how it ended |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        total = r.get("total_ms")
        lines.append(
            f"| {r['ratio']}x ({r['dirty_mib_s']} MiB/s) | {r['policy']} "
            f"| {'yes' if r.get('completed') else 'no'} | {_f(total and total / 1000, '{:.1f}')} "
            f"| {_f(r.get('downtime_ms'))} | {_f(r.get('blackout_ms'))} "
            f"| {_f(r.get('switchover_gap_ms'))} "
            f"| {_f(r.get('throttled_s'), '{:.1f}')} | {r.get('memory_intact')} "
            f"| {_f(r.get('predicted_s'), '{:.1f}')} | {r.get('how') or ''} |"
        )
    lines.append("")
    lines.append(
        "Every failed run left the VM running on its source: "
        f"{all(r['ends_on'] == 'h1' for r in report['rows'] if not r.get('completed'))}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
