"""Tearing a lab down: its processes, namespaces, links, mounts and directory; what the
record does not name is still found by the lab's name prefix.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from qmotion.hypervisor.cgroups import Cgroups, agent_group
from qmotion.lab import netns, postgres
from qmotion.lab.errors import LabInputError, LabNotFound
from qmotion.lab.processes import stop_pid
from qmotion.lab.record import NAME_RE, LabRecord, record_path


def teardown(rec: LabRecord) -> None:
    stop_managers(rec)
    for ns in rec.namespaces:
        if ns in netns.namespaces():
            netns.kill_ns_processes(ns)
    for ns in rec.namespaces:
        netns.delete_ns(ns)
    for link in rec.links:
        netns.delete_link(link)
    for host in rec.hosts:
        shutil.rmtree(host.run_dir, ignore_errors=True)
    remove_cgroups(rec)
    unmount_under(Path(rec.dir))
    shutil.rmtree(rec.dir, ignore_errors=True)


LAB_POSTGRES = "pg"  # the lab's PostgreSQL cluster, in the lab's directory


def stop_managers(rec: LabRecord) -> None:
    """Every manager of the lab, then the PostgreSQL it started for them (if any)."""
    for replica in rec.replicas:
        stop_pid(replica.pid, b"server")
    stop_pid(rec.manager_pid, b"server")
    if rec.postgres_dir is not None:
        postgres.stop(Path(rec.postgres_dir))


def remove_cgroups(rec: LabRecord) -> None:
    """The hosts' agents' cgroups (their QEMUs were killed with the namespaces)."""
    for host in rec.hosts:
        groups = Cgroups.detect(agent_group(host.name, Path(host.state_dir)))
        if groups is not None:
            groups.remove_all()


def unmount_under(directory: Path) -> None:
    """File systems the lab mounted (a small datastore's tmpfs) go before its directory."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = f"{directory.resolve()}/"
    for line in reversed(mounts):
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def lab_down(name: str = "qmlab") -> list[str]:
    """Tear the lab down; also sweeps parts found by prefix when the record is gone.

    Returns what was removed, for the operator to see.
    """
    if not NAME_RE.match(name):
        raise LabInputError(f"lab name {name!r} is not a valid lab name")
    removed: list[str] = []
    path = record_path(name)
    rec: LabRecord | None = None
    if path.is_file():
        with contextlib.suppress(ValueError):
            rec = LabRecord.model_validate_json(path.read_text())
    prefix = f"{name}-"
    namespaces = sorted(
        {*(rec.namespaces if rec else []), *(n for n in netns.namespaces() if n.startswith(prefix))}
    )
    links = sorted({*(rec.links if rec else []), *netns.links_with_prefix(prefix)})
    if rec is None and not namespaces and not links and not path.parent.exists():
        raise LabNotFound(f"no lab named {name!r} is up")
    if rec is not None:
        stop_managers(rec)
    for ns in namespaces:
        if ns in netns.namespaces():
            netns.kill_ns_processes(ns)
    for ns in namespaces:
        netns.delete_ns(ns)
        removed.append(f"namespace {ns}")
    for link in links:
        netns.delete_link(link)
        removed.append(f"link {link}")
    for run_dir in Path("/run/qmotion").glob(f"{name}-*"):
        shutil.rmtree(run_dir, ignore_errors=True)
    if rec is not None:
        remove_cgroups(rec)
    if path.parent.exists():
        # A PostgreSQL the lab started, even when its record is gone.
        if (path.parent / LAB_POSTGRES / "data" / "postmaster.pid").exists():
            postgres.stop(path.parent / LAB_POSTGRES)
            removed.append("the lab's PostgreSQL")
        unmount_under(path.parent)
        shutil.rmtree(path.parent, ignore_errors=True)
        removed.append(f"directory {path.parent}")
    return removed
