"""The flight recorder's plot: remaining bytes, throughput and dirty rate against time."""

from __future__ import annotations

from pathlib import Path

from qmotion.api.migration import MigrationReport


def switchover_at_s(r: MigrationReport) -> float | None:
    """Seconds after migrate was issued when the source stopped: QEMU's own figures (its
    total time ends with the downtime)."""
    if r.total_ms is None or r.downtime_ms is None:
        return None
    return (r.total_ms - r.downtime_ms) / 1000


def plot(r: MigrationReport, path: Path) -> None:
    """Write a PNG; the switchover is a vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a host
    import matplotlib.pyplot as plt

    t = [s.t_s for s in r.samples]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(t, [s.remaining / 2**20 for s in r.samples], label="remaining (MiB)", color="C0")
    ax.set_xlabel("seconds since migrate")
    ax.set_ylabel("remaining MiB")
    rates = ax.twinx()
    rates.plot(t, [s.throughput_bps / 2**20 for s in r.samples], label="throughput", color="C1")
    rates.plot(t, [s.dirty_bps / 2**20 for s in r.samples], label="dirty rate", color="C3")
    rates.set_ylabel("MiB/s")
    at = switchover_at_s(r)
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
