"""DRS benchmark: qmotion's planner against Ganeti's hbal on the same synthetic clusters.

    python -m bench.drs [--sizes 20x300,20x300@2:busy,1000x20000] [--hbal-timeout 600]
                        [--rules 20x300:100,1000x20000:2000]

A size is HOSTSxVMS[@SEED][:KIND], KIND one of qmotion.drs.generate.KINDS (default sized).

For each cluster: hbal balances it (timed, its moves counted, its final score read); qmotion
plans it (timed, moves counted) and its placement is written back in htools text, on which hbal
itself computes the score; both results are also measured with the DRS imbalance (RMS of the
standard deviations of hosts' normalised CPU and memory load). hbal runs are capped by a
timeout on the large clusters; the table says when the cap was hit.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import write_report
from qmotion.agent.facts import cpu_info
from qmotion.drs import ganeti
from qmotion.drs.generate import with_rules, write
from qmotion.drs.model import Policy, Snapshot
from qmotion.drs.planner import plan
from qmotion.drs.state import ClusterState

SCORE = re.compile(r"Initial score:\s*([0-9.eE+-]+)")
FINAL = re.compile(r"Cluster score improved from\s*([0-9.eE+-]+)\s*to\s*([0-9.eE+-]+)")
SOLUTION_MOVES = re.compile(r"Solution length=(\d+)")


def hbal_initial(text: Path, util: Path) -> tuple[float, str]:
    """hbal's score of a placement, as hbal computes it (no moves made), and its warnings
    (such as a node whose free memory does not add up)."""
    out = subprocess.run(
        ["hbal", "-t", str(text), "-U", str(util), "--max-length=0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    m = SCORE.search(out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"no score in hbal output: {out.stdout[-500:]} {out.stderr[-500:]}")
    return float(m.group(1)), out.stderr


def hbal_score(text: Path, util: Path) -> float:
    return hbal_initial(text, util)[0]


def run_hbal(
    text: Path, util: Path, timeout_s: float, out_dir: Path, max_length: int | None = None
) -> dict[str, Any]:
    saved = out_dir / f"{text.stem}.hbal"
    limit = [] if max_length is None else [f"--max-length={max_length}"]
    start = time.monotonic()
    try:
        out = subprocess.run(
            ["hbal", "-t", str(text), "-U", str(util), "-S", str(saved), *limit],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": timeout_s, "capped": True}
    seconds = time.monotonic() - start
    log = out.stdout + out.stderr
    final = FINAL.search(log)
    moves = SOLUTION_MOVES.search(log)
    result: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "capped": False,
        "moves": int(moves.group(1)) if moves else None,
        "score_before": float(final.group(1)) if final else None,
        "score_after": float(final.group(2)) if final else None,
    }
    # The balanced cluster hbal saved, measured with the DRS imbalance too.
    balanced = Path(f"{saved}.balanced")
    if balanced.exists():
        snap = ganeti.load(balanced, util).snapshot
        result["imbalance"] = imbalance_of(snap)
        if max_length is None and result["moves"] and result["score_after"] is not None:
            result["moves_needed"] = moves_for_score(
                text, util, 1.1 * result["score_after"], result["moves"]
            )
    return result


def moves_for_score(text: Path, util: Path, target: float, most: int) -> int | None:
    """A lower bound on the moves any plan needs to reach an hbal score of ``target``
    (None: more than ``most``).

    hbal's score adds, among other non-negative terms, cpu_load_cv and mem_load_cv: the
    population standard deviations across nodes of the summed CPU and memory columns of the
    utilisation file. A node that k of its instances leave keeps at least its load minus its
    k largest loads, and instances moving in only add to it, so with K moves in all the
    spread is at least that of the excess of such nodes over the mean, given the best split
    of the K moves among nodes (a small dynamic programme per column).
    """
    snap = ganeti.load(text).snapshot
    nodes = [h.name for h in snap.hosts]
    raw = ganeti.utilisation(util)
    loads: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in nodes}
    for vm in snap.vms:
        loads[vm.host][0].append(raw[vm.name][0])
        loads[vm.host][1].append(raw[vm.name][1])
    n = len(nodes)
    spreads = []
    for col in (0, 1):
        mean = sum(sum(loads[x][col]) for x in nodes) / n
        # least[k]: the least sum of squared excesses over the nodes so far, using k moves.
        least = [0.0] + [float("inf")] * most
        for x in nodes:
            left = sum(loads[x][col])
            excess = []
            for size in [*sorted(loads[x][col], reverse=True), 0.0][: most + 1]:
                excess.append(max(0.0, left - mean) ** 2)
                left -= size
            nxt = [float("inf")] * (most + 1)
            for used, base in enumerate(least):
                for k, e in enumerate(excess[: most + 1 - used]):
                    nxt[used + k] = min(nxt[used + k], base + e)
            least = nxt
        best = float("inf")
        spreads.append([best := min(best, v) for v in least])
    for k in range(most + 1):
        if math.sqrt(spreads[0][k] / n) + math.sqrt(spreads[1][k] / n) <= target:
            return k
    return None


def imbalance_of(snap: Snapshot) -> float:
    return round(ClusterState(snap).imbalance(), 5)


def run_qmotion(
    text: Path, util: Path, threshold: int, out_dir: Path, max_moves: int | None = None
) -> dict[str, Any]:
    cluster = ganeti.load(text, util)
    start = time.monotonic()
    policy = Policy(threshold=threshold, allocation_weight=cluster.allocation_weight)
    if max_moves is not None:
        policy = policy.model_copy(update={"max_moves": max_moves})
    result = plan(cluster.snapshot, policy, datetime.now(UTC))
    seconds = time.monotonic() - start
    exported = out_dir / f"{text.stem}.qmotion.txt"
    exported.write_text(ganeti.dump(cluster, result.placement))
    return {
        "seconds": round(seconds, 3),
        "moves": len(result.moves),
        "waves": max((m.wave for m in result.moves), default=-1) + 1,
        "imbalance_before": round(result.imbalance_before, 5),
        "imbalance": round(result.imbalance_after, 5),
        "score_after": hbal_score(exported, util),
    }


def run_rules(hosts: int, vms: int, count: int, threshold: int, work: Path) -> dict[str, Any]:
    """qmotion alone on a cluster with ``count`` rules (hbal's text format carries none)."""
    text, util = write(work, hosts, vms, 1, "sized")
    cluster = ganeti.load(text, util)
    snap = with_rules(cluster.snapshot, count)
    policy = Policy(threshold=threshold, allocation_weight=cluster.allocation_weight)
    start = time.monotonic()
    result = plan(snap, policy, datetime.now(UTC))
    seconds = time.monotonic() - start
    return {
        "hosts": hosts,
        "vms": vms,
        "rules": len(snap.rules),
        "seconds": round(seconds, 3),
        "moves": len(result.moves),
        "mandatory": sum(1 for m in result.moves if m.reason != "balance load"),
        "broken_should": len(result.broken_should),
        "unplaced": len(result.unplaced),
        "imbalance_before": round(result.imbalance_before, 5),
        "imbalance": round(result.imbalance_after, 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--sizes",
        default=(
            "20x300@1,20x300@2,20x300@3,20x300@1:busy,20x300@2:busy,20x300@3:busy,"
            "100x2000,1000x20000"
        ),
        help="HOSTSxVMS[@SEED][:KIND], comma-separated",
    )
    ap.add_argument(
        "--rules",
        default="20x300:100,1000x20000:2000",
        help="HOSTSxVMS:RULES planned by qmotion alone, comma-separated ('' for none)",
    )
    ap.add_argument("--threshold", type=int, default=5)
    ap.add_argument("--hbal-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmotion-drs-") as tmp:
        work = Path(tmp)
        for item in args.sizes.split(","):
            size, _, kind = item.partition(":")
            shape, _, seed_text = size.partition("@")
            seed = int(seed_text or 1)
            kind = kind or "sized"
            hosts, vms = (int(x) for x in shape.split("x"))
            text, util = write(work, hosts, vms, seed, kind)
            snap = ganeti.load(text, util).snapshot
            row: dict[str, Any] = {
                "hosts": hosts,
                "vms": vms,
                "seed": seed,
                "kind": kind,
                "score_before": hbal_score(text, util),
                "imbalance_before": imbalance_of(snap),
                "qmotion": run_qmotion(text, util, args.threshold, work),
                "hbal": run_hbal(text, util, args.hbal_timeout, work),
            }
            moves = row["hbal"].get("moves")
            if moves:
                # What half of hbal's moves buys each: hbal cut short by its own
                # --max-length, qmotion by Policy.max_moves.
                half = moves // 2
                cut = run_hbal(text, util, args.hbal_timeout, work, max_length=half)
                row["half"] = {
                    "moves": half,
                    "hbal_score": cut.get("score_after"),
                    "qmotion_score": run_qmotion(text, util, args.threshold, work, half)[
                        "score_after"
                    ],
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        ruled = []
        for item in filter(None, args.rules.split(",")):
            shape, _, count = item.partition(":")
            hosts, vms = (int(x) for x in shape.split("x"))
            ruled.append(run_rules(hosts, vms, int(count), args.threshold, work))
            print(json.dumps(ruled[-1]), flush=True)
    hbal_v = subprocess.run(
        ["hbal", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    cpu, _ = cpu_info()
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "cpu": cpu,
        "hbal": hbal_v,
        "threshold": args.threshold,
        "rows": rows,
        "ruled": ruled,
    }
    write_report(args.out, "drs", report, table)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['cpu']}, 2 cores, {report['date']}; {report['hbal']}; "
        f"qmotion threshold {report['threshold']}. Scores are hbal's own (lower is better).",
        "",
        "| cluster (seed, load) | score before | hbal time s | hbal moves | moves needed for 1.1x "
        "| hbal score | qmotion time s | qmotion moves | qmotion score (by hbal) "
        "| imbalance before | hbal imbalance | qmotion imbalance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        h, q = r["hbal"], r["qmotion"]
        capped = h.get("capped")
        lines.append(
            f"| {r['hosts']} hosts / {r['vms']} VMs ({r['seed']}, {r['kind']}) "
            f"| {r['score_before']:.2f} "
            f"| {'>' if capped else ''}{h['seconds']} "
            f"| {'-' if capped else h.get('moves')} "
            f"| {'-' if capped else h.get('moves_needed')} "
            f"| {'capped' if capped else format(h.get('score_after'), '.2f')} "
            f"| {q['seconds']} | {q['moves']} | {q['score_after']:.2f} "
            f"| {r['imbalance_before']} | {'-' if capped else h.get('imbalance')} "
            f"| {q['imbalance']} |"
        )
    lines += [
        "",
        "moves needed: a lower bound on the moves any plan needs to score within 1.1x hbal's "
        "own score. hbal's score adds (among non-negative terms) the spreads of nodes' summed "
        "CPU and memory load; with k moves a node sheds at most its k largest loads, so fewer "
        "moves leave a spread above that score whatever the plan (bench/drs.py "
        "moves_for_score).",
        "",
        "At half of hbal's moves (each tool limited to that many: hbal by `--max-length`, "
        "qmotion by `--max-moves`), hbal's score of the result:",
        "",
        "| cluster (seed, load) | moves | hbal score | qmotion score | full hbal score |",
        "|---|---|---|---|---|",
        *(
            f"| {r['hosts']} hosts / {r['vms']} VMs ({r['seed']}, {r['kind']}) "
            f"| {r['half']['moves']} | {r['half']['hbal_score']:.2f} "
            f"| {r['half']['qmotion_score']:.2f} | {r['hbal']['score_after']:.2f} |"
            for r in report["rows"]
            if "half" in r
        ),
        "",
        "qmotion alone on the same sized clusters (seed 1) with rules over disjoint VMs (half "
        "anti-affinity triples, one in four of them must; a quarter should-affinity pairs; a "
        "quarter should run on / not run on a tenth of the hosts), many broken at the start:",
        "",
        "| cluster | rules | time s | moves | of which mandatory | should rules left broken "
        "| unplaced | imbalance before | imbalance after |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['hosts']} hosts / {r['vms']} VMs | {r['rules']} | {r['seconds']} "
            f"| {r['moves']} | {r['mandatory']} | {r['broken_should']} | {r['unplaced']} "
            f"| {r['imbalance_before']} | {r['imbalance']} |"
            for r in report.get("ruled", [])
        ),
        "",
        "load: sized = utilisation file with CPU load in cores and memory load in GiB, growing "
        "with each VM's size; busy = a busy fraction 0.1-1.0 for CPU and memory per VM, "
        "whatever its size.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
