"""Where qmotion keeps caches, state and runtime files; each overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Build caches (guest images, accelerator probe results), shared by every lab and test."""
    return Path(os.environ.get("QMOTION_CACHE_DIR", "/var/cache/qmotion"))


def labs_dir() -> Path:
    """Lab records and datastores: one directory per lab, removed by ``lab down``."""
    return Path(os.environ.get("QMOTION_LAB_DIR", "/var/lib/qmotion/labs"))
