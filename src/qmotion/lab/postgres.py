"""A throwaway PostgreSQL cluster in a directory: for tests, the lab and the scale bench.

Debian's ``postgresql`` package, run by hand (``initdb``, ``pg_ctl``), not as a service: it
listens on a Unix socket in its own directory only (no TCP port, no address), and it is gone
with the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qmotion.lab.errors import LabSetupError

PG_ROOT = Path("/usr/lib/postgresql")
DB_NAME = "qmotion"
# Only what the package's `postgres` user runs as (initdb refuses root).
PG_USER = "postgres"


@dataclass(frozen=True)
class Cluster:
    directory: Path
    url: str  # SQLAlchemy URL of the cluster's `qmotion` database

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def bindir() -> Path:
    """The newest installed PostgreSQL's programs."""
    versions = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise LabSetupError(
            f"no PostgreSQL under {PG_ROOT}: install Debian's postgresql (make setup does)"
        )
    return versions[-1]


def _run(argv: list[str], log: Path | None = None) -> None:
    """As the postgres user when we are root (initdb and the server refuse root)."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", PG_USER, "--", *argv]
    try:
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
        raise LabSetupError(
            f"{' '.join(argv)}: {exc.stderr.decode(errors='replace')[-800:]}{tail}"
        ) from exc


def start(directory: Path, durable: bool = False) -> Cluster:
    """A new cluster in ``directory`` (made; must not hold one), started, with an empty
    database ``qmotion``. ``durable``: fsync as a production server does (the scale bench);
    tests skip it, a throwaway cluster has nothing to keep across a machine crash."""
    directory.mkdir(parents=True, exist_ok=False)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(PG_USER)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    directory.chmod(0o711)  # the socket is reached through it by root and by the managers
    pg = bindir()
    cluster = Cluster(directory, f"postgresql+psycopg://{PG_USER}@/{DB_NAME}?host={directory}")
    log = directory / "server.log"
    _run(
        [str(pg / "initdb"), "-D", str(cluster.data), "-U", PG_USER, "--auth=trust",
         "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
    )  # fmt: skip
    options = [
        "-c listen_addresses=''",
        f"-c unix_socket_directories='{directory}'",
        "-c max_connections=200",
        *([] if durable else ["-c fsync=off", "-c synchronous_commit=off"]),
    ]
    _run(
        [str(pg / "pg_ctl"), "-D", str(cluster.data), "-l", str(log), "-w", "-t", "60",
         "-o", " ".join(options), "start"],
        log,
    )  # fmt: skip
    _run([str(pg / "createdb"), "-h", str(directory), "-U", PG_USER, DB_NAME], log)
    return cluster


def stop(directory: Path) -> None:
    """Stop the cluster in ``directory`` (if it runs) and remove it."""
    data = directory / "data"
    if (data / "postmaster.pid").exists():
        with contextlib.suppress(LabSetupError):
            _run([str(bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres(directory: Path, durable: bool = False) -> Iterator[str]:
    """A running cluster's URL for the ``with`` block; stopped and removed after it."""
    try:
        cluster = start(directory, durable)
        yield cluster.url
    finally:
        stop(directory)


def _admin(cluster: Cluster, sql: str) -> None:
    import psycopg  # only here: the lab runs without PostgreSQL otherwise

    with psycopg.connect(
        host=str(cluster.directory), user=PG_USER, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(sql.encode())  # our own fixed statements, no parameters


def create_database(cluster: Cluster, name: str) -> str:
    """Another empty database in the cluster (a test's own); its SQLAlchemy URL."""
    if not name.isidentifier():
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    _admin(cluster, f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://{PG_USER}@/{name}?host={cluster.directory}"


def drop_database(cluster: Cluster, name: str) -> None:
    """Gone, with whatever sessions a test left open on it."""
    _admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
