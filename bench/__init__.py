"""Benchmarks: qmotion side by side with its baselines, in one run on one machine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_report(
    out: Path, name: str, report: dict[str, Any], table: Callable[[dict[str, Any]], str]
) -> None:
    """``NAME.json`` (every run) and ``NAME.md`` (quoted in docs/benchmarks.md) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = table(report)
    (out / f"{name}.md").write_text(md)
    print(md)
