"""Migration parameters, chosen from measurements in the lab (see bench/ and docs/migration.md).

- max-bandwidth: QEMU's default cap is 128 MiB/s; on a lab link that carries ~1.3 GB/s of
  plain TCP the cap alone more than doubles the time of a 600 MiB guest, so it is lifted unless
  the operator asks for a limit.
- downtime-limit: QEMU switches over once the remaining data fits in measured bandwidth x
  limit. The default 300 ms on a fast link leaves hundreds of MiB for the stop-and-copy phase;
  20 ms kept QEMU-reported downtime at 2-17 ms here while the guest dirtied 20 MiB/s.
- multifd: off on a LAN. Measured here, two or four channels did not shorten the transfer
  (the destination's first touch of fresh memory dominates, see docs/migration.md), and each
  channel adds a connection to set up and a thread per side on a 2-core host. Over distance one
  stream is bound by its TCP window (window / RTT), so ``streams_for`` opens enough to fill the
  path.
- pause-before-switchover: off. Steering the network happens concurrently with the switchover
  (the source forwards late frames), so holding the source paused would only add downtime.
"""

from __future__ import annotations

import math

from qmotion.api.migration import UNLIMITED_BANDWIDTH, MigrationParams
from qmotion.migration.convergence import Plan

DEFAULT_DOWNTIME_LIMIT_MS = 20
QEMU_DEFAULT_BANDWIDTH = 128 << 20
QEMU_DEFAULT_DOWNTIME_MS = 300


LAN_RTT_S = 0.005  # below this one stream's window is never the limit
MAX_STREAMS = 8
DEFAULT_RMEM_MAX = 6 << 20  # Linux's tcp_rmem maximum
TLS_STREAMS = 4
HISTORY_HEADROOM = 1.5  # the last migration's rate may have been bound by its own streams


def streams_for(
    rtt_s: float,
    window_max: int | None,
    *,
    cap_bps: int | None = None,
    history_bps: float | None = None,
    tls: bool = False,
    cpus: int = 1,
) -> int:
    """Multifd channels for a path (0: one classic stream).

    One TCP stream carries at most its window per round trip; Linux lets the receive window
    grow to half of tcp_rmem's maximum (tcp_adv_win_scale 1). A short probe over a long path
    sees slow start, not the link, so without an operator cap or an earlier migration's rate
    the path is filled with the most streams. ``cpus``: the fewer of the two hosts'.
    """
    # Encryption is the slower part of a TLS stream (one core each way per stream; QEMU
    # writes a record per page): streams spread it over the cores.
    floor = min(max(cpus, 2), TLS_STREAMS) if tls else 0
    if rtt_s < LAN_RTT_S:
        return floor
    per_stream = (window_max or DEFAULT_RMEM_MAX) / 2 / rtt_s
    target = cap_bps or (history_bps * HISTORY_HEADROOM if history_bps else None)
    if target is None:
        return MAX_STREAMS
    return max(min(max(math.ceil(target / per_stream), 2), MAX_STREAMS), floor)


def apply_plan(params: MigrationParams, p: Plan) -> MigrationParams:
    """What QEMU is told at the start, from the convergence plan. QEMU refuses xbzrle with
    multifd ("Multifd is not compatible with xbzrle"): the streams, fixed on the destination
    already, win, and the ladder's other rungs carry a hot set."""
    return params.model_copy(
        update={
            "downtime_limit_ms": p.initial_downtime_ms,
            "auto_converge": p.auto_converge,
            "throttle_initial_pct": p.throttle_from_start_pct,
            "xbzrle_cache_bytes": p.xbzrle_cache_bytes if params.multifd_channels == 0 else 0,
        }
    )


def choose(
    max_downtime_ms: int | None,
    bandwidth: int | None,
    timeout_s: float | None = None,
    *,
    allow_postcopy: bool = False,
) -> MigrationParams:
    """The start; the convergence plan (qmotion.migration.convergence) adjusts it from
    measurements, and the ladder raises the downtime limit up to ``max_downtime_ms``."""
    return MigrationParams(
        max_bandwidth=bandwidth or UNLIMITED_BANDWIDTH,
        downtime_limit_ms=min(DEFAULT_DOWNTIME_LIMIT_MS, max_downtime_ms or 1 << 30),
        max_downtime_ms=max_downtime_ms,
        timeout_s=timeout_s,
        postcopy=allow_postcopy,
        multifd_channels=0,
        pause_before_switchover=False,
        steer=True,
        forward=True,
    )


def qemu_defaults() -> MigrationParams:
    """What a plain ``migrate`` does: QEMU's own defaults, nothing around the switchover.
    The baseline of the benchmark."""
    return MigrationParams(
        max_bandwidth=QEMU_DEFAULT_BANDWIDTH,
        downtime_limit_ms=QEMU_DEFAULT_DOWNTIME_MS,
        multifd_channels=0,
        pause_before_switchover=False,
        steer=False,
        forward=False,
    )
