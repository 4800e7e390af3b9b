"""The agent's configuration: who it is, where it keeps state, what datastores it serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DatastoreConfig:
    name: str
    path: Path
    shared: bool


@dataclass(frozen=True)
class AgentConfig:
    name: str
    state_dir: Path
    # None: the control API is mutual TLS (a joined host) and takes no bearer token.
    token: str | None
    run_dir: Path = Path("/run/qmotion/agent")
    address: str | None = None
    port: int = 8100
    # Addresses to receive migrations on, preferred first; the management address is the last
    # fallback. The agent also listens on each (the path probe measures the real route).
    migration_addresses: tuple[str, ...] = ()
    accel: str = "auto"
    # Back guests from the host's huge-page pool when it has room (see hypervisor.hugepages).
    hugepages: bool = True
    datastores: tuple[DatastoreConfig, ...] = field(default_factory=tuple)
    # The capacity this host offers VMs, when it is less than the machine's (a lab host on
    # a shared machine, a host keeping cores for other work): reported in its facts.
    cpus: int | None = None
    memory_bytes: int | None = None
    # The unprivileged user QEMU runs as (hypervisor.user); None: the agent's own user, which
    # only tests that start QEMU in-process choose (the command's default is qmotion-qemu).
    qemu_user: str | None = None
    # Each QEMU in a cgroup of its own with limits (hypervisor.cgroups), where the host has a
    # writable hierarchy; the command's default is on.
    cgroups: bool = False

    def datastore(self, name: str) -> DatastoreConfig | None:
        return next((d for d in self.datastores if d.name == name), None)


def parse_datastore(text: str) -> DatastoreConfig:
    """``NAME=PATH`` (host-local) or ``NAME=PATH:shared`` (seen by other hosts too)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"datastore must be NAME=PATH[:shared], got {text!r}")
    shared = rest.endswith(":shared")
    path = Path(rest.removesuffix(":shared"))
    if not path.is_absolute():
        raise ValueError(f"datastore {name}: path must be absolute, got {path}")
    return DatastoreConfig(name=name, path=path, shared=shared)
