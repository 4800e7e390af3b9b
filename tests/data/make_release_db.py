"""Makes release-bd57676.db: a manager database written by the last release before Alembic.

Run with that release's code (``git worktree add /tmp/rel bd57676``, then
``PYTHONPATH=/tmp/rel/src python tests/data/make_release_db.py FILE``): it fills every table
through the models of that time, so the upgrade test reads rows only that code could write.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from qmotion.api.vm import Nic, VmSpec
from qmotion.server.automation.schedules import Schedule, ScheduleRun
from qmotion.server.db import (
    ApiToken,
    AuditRecord,
    Database,
    Host,
    HostMaintenance,
    Image,
    JoinToken,
    PlacementRule,
    Recommendation,
    Setting,
    Task,
    TaskEvent,
    User,
    Vm,
)

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def main(path: str) -> None:
    db = Database(f"sqlite:///{path}")
    with db.session() as s:
        hosts = [
            Host(
                name=f"h{i}",
                agent_url=f"https://198.18.7.{10 + i}:8100",
                token=f"tok{i}",
                facts={"cpus": 4, "memory_mib": 8192},
                registered_at=T0,
                last_seen=T0,
                approved=[f"198.18.7.{10 + i}"],
            )
            for i in range(3)
        ]
        s.add_all(hosts)
        s.flush()
        for i in range(6):
            s.add(
                Vm(
                    name=f"vm{i}",
                    uuid=f"00000000-0000-4000-8000-{i:012d}",
                    mac=f"52:54:00:00:07:{i:02x}",
                    address=f"198.18.7.{100 + i}",
                    host_id=hosts[i % 3].id,
                    state="running" if i % 2 else "stopped",
                    spec=VmSpec(
                        name=f"vm{i}",
                        uuid=f"00000000-0000-4000-8000-{i:012d}",
                        memory="256M",
                        nics=[Nic(mac=f"52:54:00:00:07:{i:02x}")],
                    ).model_dump(mode="json"),
                    memory_mib=256,
                    created_at=T0,
                    attention="check me" if i == 5 else None,
                )
            )
        s.add(
            Image(
                name="base",
                datastore="local",
                path="/var/lib/qmotion/images/base.qcow2",
                format="qcow2",
                virtual_size=1 << 30,
                allocated_bytes=1 << 28,
                source="upload",
                host="h0",
                created_at=T0,
            )
        )
        s.add(
            PlacementRule(
                name="apart", kind="anti-affinity", strength="must", vms=["vm0", "vm1"], hosts=[]
            )
        )
        s.add(
            Recommendation(
                run_id=1,
                vm="vm1",
                source="h1",
                target="h2",
                priority=2,
                reason="balance",
                gain=0.1,
                wave=0,
                created_at=T0,
            )
        )
        s.add(HostMaintenance(host="h2", task_id=None, reason=None, evacuated={"vm4": "h0"}))
        s.add(Setting(key="pool", value={"first": "198.18.7.100", "last": "198.18.7.200"}))
        done = Task(
            kind="migrate",
            state="succeeded",
            vm="vm1",
            source="h0",
            destination="h1",
            phase="done",
            progress=1.0,
            params={"max_downtime_ms": 300},
            machine={"phase": "done"},
            stats={"total": 1},
            result={"total_ms": 900},
            created_at=T0,
            started_at=T0,
            ended_at=T0 + timedelta(seconds=1),
        )
        done.events.append(TaskEvent(at=T0, kind="started", message="started"))
        done.events.append(TaskEvent(at=T0, kind="succeeded", message="succeeded"))
        s.add(done)
        s.add(
            Task(
                kind="migrate",
                state="running",
                vm="vm3",
                source="h1",
                destination="h2",
                phase="copy",
                machine=None,
                created_at=T0,
                started_at=T0,
            )
        )
        user = User(name="alice", role="operator", created_at=T0)
        s.add(user)
        s.flush()
        s.add(
            ApiToken(user_id=user.id, digest="a" * 64, prefix="qm_abcd", label="ci", created_at=T0)
        )
        s.add(
            JoinToken(
                digest="b" * 64,
                host="h3",
                address="198.18.7.13",
                port=8100,
                migration=None,
                created_at=T0,
                expires_at=T0 + timedelta(hours=1),
            )
        )
        s.add(
            AuditRecord(
                at=T0,
                user="alice",
                role="operator",
                method="POST",
                path="/v1/vms/vm1/migrate",
                route="/v1/vms/{name}/migrate",
                status=202,
                client="198.18.7.2",
                task_id=1,
            )
        )
        sched = Schedule(
            name="nightly",
            at=None,
            cron="0 2 * * *",
            action="drs",
            grace_s=300,
            next_run_at=T0 + timedelta(hours=14),
            created_at=T0,
        )
        s.add(sched)
        s.flush()
        s.add(
            ScheduleRun(
                schedule_id=sched.id,
                at=T0,
                ran_at=T0,
                outcome="started",
                task_id=1,
                message="task 1",
            )
        )


if __name__ == "__main__":
    main(sys.argv[1])
