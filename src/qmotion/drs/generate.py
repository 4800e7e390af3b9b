"""Synthetic skewed clusters, written as Ganeti text files (and as snapshots), for benchmarks.

Skewed as a cluster gets after growth or a host replacement: most VMs sit on a third of the
hosts. Deterministic for a seed. Two kinds of utilisation file:
  sized  CPU load in cores (a share of the instance's vCPUs) and memory load in GiB (its
         memory): big instances are big loads.
  busy   each instance's load as monitoring reports it, a busy fraction 0.1-1.0 for CPU and for
         memory, whatever the instance's size. hbal starts such clusters near a score of 20.
"""

from __future__ import annotations

import random
from pathlib import Path

from qmotion.drs.model import Rule, Snapshot

NODE_MEM_MIB = 262_144
NODE_RESERVED_MIB = 4_096
NODE_CPUS = 64
VM_MEM_CHOICES = (1024, 2048, 4096, 4096, 8192, 8192, 16384)
KINDS = ("sized", "busy")


def ganeti_cluster(hosts: int, vms: int, seed: int = 1, kind: str = "sized") -> tuple[str, str]:
    """(cluster text, utilisation text) for ``hosts`` nodes and ``vms`` instances; the same
    placement for a seed whatever the kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    rnd = random.Random(seed)
    busy = random.Random(seed + 1_000_003)
    group = "00000000-0000-0000-0000-000000000001"
    nodes = [f"node{i:04d}" for i in range(hosts)]
    crowded = nodes[: max(1, hosts // 3)]
    cap = NODE_MEM_MIB - NODE_RESERVED_MIB
    used = dict.fromkeys(nodes, 0)
    inst_lines, util_lines = [], []
    for i in range(vms):
        mem = rnd.choice(VM_MEM_CHOICES)
        pool = crowded if rnd.random() < 0.85 else nodes
        # Never overcommit: fall back to any node with room.
        order = [n for n in rnd.sample(pool, len(pool)) if used[n] + mem <= cap * 0.97]
        if not order:
            order = [n for n in nodes if used[n] + mem <= cap * 0.97]
        if not order:
            raise ValueError("cluster too small for that many instances")
        node = order[0]
        used[node] += mem
        vcpus = max(1, mem // 2048)
        name = f"inst{i:05d}"
        inst_lines.append(f"{name}|{mem}|10240|{vcpus}|running|Y|{node}||sharedfile||1")
        cpu = round(rnd.uniform(0.1, 1.0) * vcpus, 2)
        # CPU and memory load only: the two dimensions DRS balances. With disk and network
        # at 1.0 per instance, hbal would also equalise instance counts.
        if kind == "sized":
            util_lines.append(f"{name} {cpu} {mem / 1024:.2f} 0 0")
        else:
            util_lines.append(f"{name} {busy.uniform(0.1, 1):.2f} {busy.uniform(0.1, 1):.2f} 0 0")
    node_lines = [
        f"{n}|{NODE_MEM_MIB}|{NODE_RESERVED_MIB}|{cap - used[n]}|1048576|1048576|{NODE_CPUS}|N|"
        f"{group}|1"
        for n in nodes
    ]
    groups = [f"default|{group}|preferred|"]
    # No policy section: hbal then applies Ganeti's default instance policy.
    text = join_sections([groups, node_lines, inst_lines, []])
    return text, "\n".join(util_lines) + "\n"


def join_sections(sections: list[list[str]]) -> str:
    """htools text: sections separated by one blank line each (an empty section included)."""
    lines: list[str] = []
    for i, section in enumerate(sections):
        if i:
            lines.append("")
        lines.extend(section)
    return "\n".join(lines) + "\n"


def write(
    directory: Path, hosts: int, vms: int, seed: int = 1, kind: str = "sized"
) -> tuple[Path, Path]:
    text, util = ganeti_cluster(hosts, vms, seed, kind)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"cluster-{hosts}-{vms}-{seed}-{kind}"
    t, u = directory / f"{stem}.txt", directory / f"{stem}.util"
    t.write_text(text)
    u.write_text(util)
    return t, u


def with_rules(snap: Snapshot, count: int, seed: int = 1) -> Snapshot:
    """``snap`` with ``count`` rules over disjoint VMs, as an operator writes them: half
    anti-affinity triples (must or should), a quarter should-affinity pairs, a quarter run-on
    or must-not-run-on a tenth of the hosts (should). The current placement may break them."""
    rnd = random.Random(seed)
    vms = [v.name for v in snap.vms]
    hosts = [h.name for h in snap.hosts]
    rnd.shuffle(vms)
    rules: list[Rule] = []
    at = 0
    for i in range(count):
        kind = ("anti_affinity", "anti_affinity", "affinity", "host")[i % 4]
        size = 3 if kind == "anti_affinity" else 2
        members, at = vms[at : at + size], at + size
        if len(members) < size:
            break
        if kind == "anti_affinity":
            strength = "must" if i % 8 == 0 else "should"
            rules.append(Rule(name=f"apart{i}", kind=kind, strength=strength, vms=members))
        elif kind == "affinity":
            rules.append(Rule(name=f"together{i}", kind=kind, strength="should", vms=members))
        else:
            on = rnd.sample(hosts, max(1, len(hosts) // 10))
            host_kind = "run_on" if i % 8 == 3 else "not_run_on"
            rules.append(
                Rule(name=f"hosts{i}", kind=host_kind, strength="should", vms=members, hosts=on)
            )
    return snap.model_copy(update={"rules": rules})
