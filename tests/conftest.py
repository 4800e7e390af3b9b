"""Shared test fixtures: isolated state directories for everything qmotion writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmotion.lab import postgres


@pytest.fixture(autouse=True, scope="session")
def _isolated_labs() -> Iterator[None]:
    """Lab records go to a per-run directory; the image cache stays shared (built once).

    Not under pytest's temporary directory: that is closed to other users (0700), and the
    labs' QEMUs run as the unprivileged qmotion-qemu, which must pass through to the labs'
    datastores (searchable, not listable, as /var/lib is on a real host).
    """
    old = os.environ.get("QMOTION_LAB_DIR")
    labs = Path(tempfile.mkdtemp(prefix="qmotion-test-labs-"))
    labs.chmod(0o711)
    os.environ["QMOTION_LAB_DIR"] = str(labs)
    yield
    # What a failed test's lab left is kept for a look (its namespaces are gone).
    if not any(labs.iterdir()):
        shutil.rmtree(labs, ignore_errors=True)
    if old is None:
        os.environ.pop("QMOTION_LAB_DIR", None)
    else:
        os.environ["QMOTION_LAB_DIR"] = old


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.Cluster]:
    """One throwaway PostgreSQL for the run (Debian's, started by hand; `make setup`
    installs it): each test gets a database of its own in it (``db_url``)."""
    base = Path(tempfile.mkdtemp(prefix="qmotion-test-pg-"))
    base.chmod(0o711)  # the server runs as postgres and reaches its directory through it
    try:
        yield postgres.start(base / "pg")
    finally:
        postgres.stop(base / "pg")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The manager's database, once on each backend: SQLite (a file) and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    cluster: postgres.Cluster = request.getfixturevalue("postgres_cluster")
    name = "t_" + os.urandom(6).hex()
    yield postgres.create_database(cluster, name)
    postgres.drop_database(cluster, name)
