"""The lab's record (``labs_dir()/NAME/lab.json``): what a lab is made of, written before each
part is made, so that any later command (``lab down`` too, after a partial ``lab up``) finds it.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from qmotion.lab.errors import LabNotFound
from qmotion.paths import labs_dir

# The name prefixes every namespace and link the lab makes.
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class LabHost(BaseModel):
    name: str
    namespace: str
    address: str
    agent_url: str
    token_file: str
    state_dir: str
    run_dir: str
    local_datastore: str
    agent_pid: int | None = None
    migration_address: str | None = None
    # Overrides the lab's choice, e.g. to mix hosts with and without a huge-page pool.
    hugepages: bool | None = None
    # The agent's config file `qmotion agent join` wrote (a lab with a cluster CA).
    config_file: str | None = None


class LabDatastore(BaseModel):
    name: str
    path: str
    shared: bool
    hosts: list[str]
    size_mib: int | None = Field(default=None, description="a tmpfs of this size (else the disk)")


class AddressPool(BaseModel):
    first: str
    last: str
    prefixlen: int


class LabReplica(BaseModel):
    """A manager beside the lab's own, on the same database (``Lab.start_replica``)."""

    name: str
    url: str
    pid: int | None = None


class LabRecord(BaseModel):
    name: str
    dir: str
    subnet: str
    switch: str
    switch_address: str
    client_namespace: str
    client_address: str
    hosts: list[LabHost] = Field(default_factory=list)
    datastores: list[LabDatastore] = Field(default_factory=list)
    pool: AddressPool
    rtt_ms: float = 0.0
    bandwidth: str | None = None
    migration_subnet: str | None = None
    insecure: bool = False  # plaintext migration streams (no cluster CA)
    created_at: datetime
    links: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    ready: bool = False
    wire_pid: int | None = None
    manager_url: str | None = None
    manager_token_file: str | None = None
    manager_ca_file: str | None = None  # the cluster CA the manager's HTTPS is checked against
    manager_pid: int | None = None
    # The manager's database: None, the lab's SQLite file; else a PostgreSQL the lab started
    # (in postgres_dir, stopped with the lab). More managers on it: replicas.
    db_url: str | None = None
    postgres_dir: str | None = None
    lease_s: float = 10.0
    replicas: list[LabReplica] = Field(default_factory=list)
    hugepages: bool = True
    # What each host offers VMs (its agent's --cpus/--memory); None: the whole machine.
    host_cpus: int | None = None
    host_memory_mib: int | None = None

    def public(self) -> dict[str, object]:
        """The ``lab status --json`` view: no secrets (tokens stay in their files)."""
        return {
            "name": self.name,
            "subnet": self.subnet,
            "ready": self.ready,
            "switch": {"bridge": self.switch, "address": self.switch_address},
            "hosts": [
                {
                    "name": h.name,
                    "namespace": h.namespace,
                    "address": h.address,
                    "migration_address": h.migration_address,
                    "agent_url": h.agent_url,
                    "token_file": h.token_file,
                    "agent_pid": h.agent_pid,
                    "local_datastore": h.local_datastore,
                }
                for h in self.hosts
            ],
            "client": {"namespace": self.client_namespace, "address": self.client_address},
            "datastores": [d.model_dump() for d in self.datastores],
            "address_pool": self.pool.model_dump(),
            "manager": {
                "url": self.manager_url,
                "token_file": self.manager_token_file,
                "ca_file": self.manager_ca_file,
                "pid": self.manager_pid,
                "database": "postgresql" if self.postgres_dir else "sqlite",
                "replicas": [r.model_dump() for r in self.replicas],
            },
            "rtt_ms": self.rtt_ms,
            "bandwidth": self.bandwidth,
            "migration_subnet": self.migration_subnet,
            "tls": not self.insecure,
            "host_cpus": self.host_cpus,
            "host_memory_mib": self.host_memory_mib,
            "created_at": self.created_at.isoformat(),
        }


def record_path(name: str) -> Path:
    return labs_dir() / name / "lab.json"


def save(rec: LabRecord) -> None:
    path = Path(rec.dir) / "lab.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.model_dump_json(indent=2))
    os.replace(tmp, path)


def load_lab(name: str) -> LabRecord:
    path = record_path(name)
    if not path.is_file():
        raise LabNotFound(f"no lab named {name!r} is up (looked for {path})")
    return LabRecord.model_validate_json(path.read_text())
