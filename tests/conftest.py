"""Shared test fixtures: isolated state directories for everything qmotion writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Lab records go to a per-run directory; the image cache stays shared (built once)."""
    old = os.environ.get("QMOTION_LAB_DIR")
    os.environ["QMOTION_LAB_DIR"] = str(tmp_path_factory.mktemp("labs"))
    yield
    if old is None:
        os.environ.pop("QMOTION_LAB_DIR", None)
    else:
        os.environ["QMOTION_LAB_DIR"] = old


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
