"""Memory promised on each host (what the pre-checks and DRS count): a VM is counted once,
on its host, plus once on the destination of a migration that has not moved it yet."""

from __future__ import annotations

from pathlib import Path

from qmotion.server.db import Database, Host, Task, Vm
from qmotion.server.inventory import Inventory


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.session() as s:
        h1 = Host(name="h1", agent_url="http://x", token="t")
        h2 = Host(name="h2", agent_url="http://y", token="t")
        s.add_all([h1, h2])
        for i, host in enumerate((h1, h1, h2)):
            s.add(
                Vm(
                    name=f"vm{i}",
                    uuid=f"00000000-0000-0000-0000-00000000000{i}",
                    mac=f"52:54:00:00:00:0{i}",
                    host=host,
                    state="running",
                    spec={},
                    memory_mib=1024,
                )
            )
    return db


def test_a_migration_under_way_is_promised_on_its_destination(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        s.add(Task(kind="migrate", state="running", vm="vm0", source="h1", destination="h2"))
    with db.session() as s:
        assert Inventory.committed(s) == {"h1": 2048, "h2": 2048}


def test_a_migration_that_moved_the_inventory_is_not_counted_twice(tmp_path: Path) -> None:
    """Its last steps (announce, the source's release) still run with the task active while
    the inventory already names the destination: the VM is counted there once. Counted twice,
    a maintenance that brings six VMs back refused the last ones for memory they do not use."""
    db = _db(tmp_path)
    with db.session() as s:
        vm = s.query(Vm).filter_by(name="vm0").one()
        vm.host = s.query(Host).filter_by(name="h2").one()
        s.add(Task(kind="migrate", state="running", vm="vm0", source="h1", destination="h2"))
    with db.session() as s:
        assert Inventory.committed(s) == {"h1": 1024, "h2": 2048}
