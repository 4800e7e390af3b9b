"""``qmotion drs plan`` and ``drs place`` offline: real files in, plan and placement out."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qmotion.cli.main import app
from qmotion.drs import ganeti
from qmotion.drs.generate import write
from qmotion.drs.state import ClusterState

runner = CliRunner()


def test_plan_a_ganeti_cluster_and_write_it_back(tmp_path: Path) -> None:
    text, util = write(tmp_path, 6, 80, seed=3, kind="busy")
    out = tmp_path / "balanced.txt"
    res = runner.invoke(
        app,
        ["drs", "plan", "--ganeti-text", str(text), "--ganeti-util", str(util),
         "--threshold", "5", "--json", "--emit-ganeti-text", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    planned = json.loads(res.stdout)
    assert planned["moves"] and planned["imbalance_after"] < planned["imbalance_before"] / 10
    # The written cluster has every VM where the plan sends it, and measures as planned.
    back = ganeti.load(out, util).snapshot
    start = {v.name: v.host for v in ganeti.load(text, util).snapshot.vms}
    where = {v.name: v.host for v in back.vms}
    for m in planned["moves"]:
        assert (start[m["vm"]], where[m["vm"]]) == (m["from"], m["to"])
    assert {v for v in where if where[v] != start[v]} == {m["vm"] for m in planned["moves"]}
    assert round(ClusterState(back).imbalance(), 6) == planned["imbalance_after"]


def test_allocation_weight_zero_balances_demand_alone(tmp_path: Path) -> None:
    text, util = write(tmp_path, 6, 80, seed=3, kind="busy")
    args = ["drs", "plan", "--ganeti-text", str(text), "--ganeti-util", str(util), "--json"]
    implied = json.loads(runner.invoke(app, [*args, "--threshold", "5"]).stdout)
    demand = json.loads(
        runner.invoke(app, [*args, "--threshold", "5", "--allocation-weight", "0"]).stdout
    )
    # Demand alone reaches at least as even a demand; the default also evens allocation.
    assert demand["imbalance_after"] <= implied["imbalance_after"] + 1e-6
    assert demand["moves"] != implied["moves"]


def test_snapshot_with_a_vm_on_an_unknown_host_is_refused(tmp_path: Path) -> None:
    snap = tmp_path / "cluster.json"
    snap.write_text(
        json.dumps(
            {
                "hosts": [{"name": "h1", "cpu_capacity": 8, "memory_mib": 16384}],
                "vms": [{"name": "web1", "host": "h9", "memory_mib": 1024}],
            }
        )
    )
    res = runner.invoke(app, ["drs", "plan", "--snapshot", str(snap), "--json"])
    assert res.exit_code == 2
    assert "web1" in res.output and "h9" in res.output
    assert res.stdout.strip() == "" or "moves" not in res.stdout


def test_negative_capacity_names_the_field(tmp_path: Path) -> None:
    snap = tmp_path / "cluster.json"
    snap.write_text(json.dumps({"hosts": [{"name": "h1", "cpu_capacity": -1, "memory_mib": 1}]}))
    res = runner.invoke(app, ["drs", "plan", "--snapshot", str(snap)])
    assert res.exit_code == 2
    assert "hosts.0.cpu_capacity" in res.output


def test_place_ranks_the_host_with_room_first(tmp_path: Path) -> None:
    snap = tmp_path / "cluster.json"
    snap.write_text(
        json.dumps(
            {
                "hosts": [
                    {"name": "busy", "cpu_capacity": 16, "memory_mib": 16384},
                    {"name": "idle", "cpu_capacity": 16, "memory_mib": 16384},
                ],
                "vms": [{"name": "a", "host": "busy", "memory_mib": 12288, "vcpus": 8}],
            }
        )
    )
    res = runner.invoke(
        app,
        [
            "drs",
            "place",
            "--snapshot",
            str(snap),
            "--vm",
            '{"name": "b", "memory_mib": 8192}',
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    ranked = json.loads(res.stdout)
    assert [(c["host"], c["feasible"]) for c in ranked] == [("idle", True), ("busy", False)]


def test_max_moves_limits_the_plan(tmp_path: Path) -> None:
    text, util = write(tmp_path, 6, 80, seed=3, kind="busy")
    args = ["drs", "plan", "--ganeti-text", str(text), "--ganeti-util", str(util), "--json"]
    full = json.loads(runner.invoke(app, [*args, "--threshold", "5"]).stdout)
    res = runner.invoke(app, [*args, "--threshold", "5", "--max-moves", "5"])
    assert res.exit_code == 0, res.output
    capped = json.loads(res.stdout)
    assert len(capped["moves"]) == 5 < len(full["moves"])
    assert full["imbalance_after"] < capped["imbalance_after"] < capped["imbalance_before"]
    bad = runner.invoke(app, [*args, "--max-moves", "-1"])
    assert bad.exit_code == 2 and "--max-moves" in bad.output
