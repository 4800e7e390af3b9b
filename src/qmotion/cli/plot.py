"""The flight recorder's plot: remaining bytes, throughput and dirty rate against time."""

from __future__ import annotations

from pathlib import Path

from qmotion.api.migration import MigrationReport, switchover_at_s

# Up to this many samples each one gets a marker: a short migration's one or two samples
# are otherwise an invisible zero-length line; past it the markers would hide the lines.
MARKED_SAMPLES = 120


def plot(r: MigrationReport, path: Path) -> None:
    """Write a PNG; the switchover is a vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a host
    import matplotlib.pyplot as plt

    t = [s.t_s for s in r.samples]
    marker = "o" if len(r.samples) <= MARKED_SAMPLES else ""
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    remaining = [s.remaining / 2**20 for s in r.samples]
    ax.plot(t, remaining, label="remaining (MiB)", color="C0", marker=marker, markersize=4)
    ax.set_xlabel("seconds since migrate")
    ax.set_ylabel("remaining MiB")
    rates = ax.twinx()
    for label, colour, values in (
        ("throughput", "C1", [s.throughput_bps / 2**20 for s in r.samples]),
        ("dirty rate", "C3", [s.dirty_bps / 2**20 for s in r.samples]),
    ):
        rates.plot(t, values, label=label, color=colour, marker=marker, markersize=4)
    rates.set_ylabel("MiB/s")
    at = switchover_at_s(r)
    if len(t) == 1:
        # matplotlib centres a lone point in a +-5% sliver around it; from zero to twice its
        # time (and the switchover) it reads as one moment of a migration.
        ax.set_xlim(0, max(2 * t[0], 1.0, (at or 0.0) * 1.05))
    if at is not None:
        ax.axvline(at, color="k", linestyle="--", linewidth=1)
        ax.annotate(f"switchover ({r.downtime_ms} ms)", (at, 0), rotation=90, va="bottom")
    lines = ax.get_legend_handles_labels()
    more = rates.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    ax.set_title(f"{r.vm}: {r.source} -> {r.destination} ({r.outcome})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
