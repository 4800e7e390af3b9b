"""``qmotion demo``: the main job on a local lab, end to end, with its figures."""

from __future__ import annotations

from qmotion.cli.common import console


def demo() -> None:
    """Run the live-migration demo on a throwaway 3-host lab."""
    console.print("live-migration demo: not yet (arrives with the migration engine)")
