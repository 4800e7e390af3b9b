"""The scripted QEMU: its migration settings as QEMU 10 checks them, and the state of a pre-copy.

What a scripted guest writes (``Guest``), the path between hosts (``Link``) and the simulated
time (``SimClock``) are the pre-copy's inputs; tests/unit/agent_world/cluster.py runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
GUEST_BYTES = 256 * MIB
PAGE = 4096
FINISHED = ("completed", "failed", "cancelled")
STEP_S = 0.01  # the simulation's step
HOT_ROUND_S = 0.01  # a hot set is rewritten within this much running time
BUFFER_DELAY_S = 0.1  # QEMU measures its transfer rate over windows this long
THROTTLE_PERIOD_S = 1.0  # migration_bitmap_sync: rates and auto-converge, at most once a second
BG_SYNC_S = 5.0  # cpu-throttle.c: with auto-converge, a sync at least this often
MAX_MIGRATE_DOWNTIME_MS = 2000 * 1000
# QEMU 10's defaults (migration/options.c), before the agent sets anything.
QEMU_PARAMETERS: dict[str, int] = {
    "downtime-limit": 300,
    "max-bandwidth": 128 * MIB,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "throttle-trigger-threshold": 50,
    "max-cpu-throttle": 99,
    "xbzrle-cache-size": 64 * MIB,
    "multifd-channels": 2,
    "max-postcopy-bandwidth": 0,
    "multifd-zstd-level": 1,
}
# The enum parameters qmotion sets, with the values QEMU 10 accepts (qapi/migration.json).
QEMU_ENUM_PARAMETERS: dict[str, tuple[str, ...]] = {
    # Debian's QEMU 10.0.2 (bookworm-backports) is built with zlib and zstd only.
    "multifd-compression": ("none", "zlib", "zstd"),
}
QEMU_CAPABILITIES = (
    "events",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "xbzrle",
    "postcopy-ram",
)


class QmpError(Exception):
    """A QMP command QEMU refused (GenericError)."""


def check_parameters(params: dict[str, Any]) -> None:
    """QEMU's migrate_params_check, for the parameters qmotion sets; raises QmpError."""
    unknown = set(params) - set(QEMU_PARAMETERS) - set(QEMU_ENUM_PARAMETERS)
    if unknown:
        raise QmpError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
    for name, value in params.items():
        if name in QEMU_ENUM_PARAMETERS:
            if value not in QEMU_ENUM_PARAMETERS[name]:
                raise QmpError(f"Parameter '{name}' does not accept value '{value}'")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise QmpError(f"Parameter '{name}' expects uint64")
    p = QEMU_PARAMETERS | {k: v for k, v in params.items() if k not in QEMU_ENUM_PARAMETERS}
    if not 0 <= p["multifd-zstd-level"] <= 20:
        raise QmpError("Option multifd_zstd_level expects an integer 0 to 20")
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise QmpError("Option throttle_trigger_threshold expects an integer 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise QmpError("Option cpu_throttle_initial expects an integer 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise QmpError("Option cpu_throttle_increment expects an integer 1 to 99")
    if p["downtime-limit"] > MAX_MIGRATE_DOWNTIME_MS:
        raise QmpError("Option downtime_limit expects an integer 0 to 2000000 ms")
    if not 1 <= p["multifd-channels"] <= 255:
        raise QmpError("Option multifd_channels expects a value between 1 and 255")
    size = p["xbzrle-cache-size"]
    if size < PAGE or size & (size - 1):
        raise QmpError(
            "Option xbzrle_cache_size expects a power of two no less than the target page size"
        )
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise QmpError("max_cpu_throttle expects an integer cpu_throttle_initial to 99")


def check_capabilities(caps: list[dict[str, Any]]) -> dict[str, bool]:
    """QEMU's migrate_caps_check, for the capabilities qmotion sets; raises QmpError."""
    out: dict[str, bool] = {}
    for c in caps:
        if c.get("capability") not in QEMU_CAPABILITIES:
            raise QmpError(f"Invalid parameter '{c.get('capability')}'")
        out[str(c["capability"])] = bool(c["state"])
    if out.get("multifd") and out.get("xbzrle"):
        raise QmpError("Multifd is not compatible with xbzrle")
    if out.get("multifd") and out.get("postcopy-ram"):
        raise QmpError("Postcopy is not yet compatible with multifd")  # QEMU 10.0.2, measured
    return out


@dataclass
class Guest:
    """What a scripted guest writes: ``sweep_bps`` of new pages per second of vCPU time, over
    its resident memory; ``hot_bytes`` its vCPUs rewrite constantly; ``dma_bytes`` device
    emulation rewrites constantly (not slowed by throttling the vCPUs)."""

    sweep_bps: float = 0.0
    hot_bytes: int = 0
    dma_bytes: int = 0
    resident_bytes: int | None = None  # None: all of its memory


@dataclass
class Link:
    """The migration path between any two hosts."""

    bandwidth_bps: float = 1.25e9
    rtt_ms: float = 0.2
    probe_bps: float | None = None  # what the agents' HTTP probe measures; None: bandwidth


class SimClock:
    """The simulated time: agent requests and QEMU's progress advance it, nothing else. Hand
    its ``monotonic`` to the task runner as its clock."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def monotonic(self) -> float:
        return self.t


@dataclass
class FakeQemu:
    """One QEMU's migration settings and vCPU throttle."""

    caps: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(QEMU_CAPABILITIES, False))
    params: dict[str, int] = field(default_factory=lambda: dict(QEMU_PARAMETERS))
    throttle_pct: int = 0  # 0: not throttling

    def set_capabilities(self, caps: list[dict[str, Any]], migrating: bool) -> None:
        if migrating:
            raise QmpError("There's a migration process in progress")
        self.caps |= check_capabilities(caps)

    def set_parameters(self, params: dict[str, Any]) -> None:
        check_parameters(params)
        self.params |= params


@dataclass
class Precopy:
    """QEMU's outgoing RAM migration on the source (migration/ram.c's RAMState, roughly)."""

    started: float
    memory: int
    resident: int
    bitmap: float  # dirty and not yet sent: QEMU's "remaining"
    # Of which in the guest's hot set and in what device emulation rewrites: pages found
    # dirty again while still marked are not new.
    bitmap_hot: float = 0.0
    bitmap_dma: float = 0.0
    transferred: float = 0.0
    syncs: int = 1  # dirty-sync-count: the first sync is at setup
    swept: float = 0.0  # written by the sweep since the last sync
    cpu_s: float = 0.0  # vCPU running time since the last sync
    wall_s: float = 0.0  # time since the last sync
    period_start: float = 0.0
    period_dirty: float = 0.0  # num_dirty_pages_period, in bytes
    xfer_prev: float = 0.0
    high: int = 0  # dirty_rate_high_cnt
    dirty_pages_rate: int = 0
    dirty_bytes_last_sync: float = 0.0
    expected_downtime_ms: int = 0
    mbps: float = 0.0
    window_start: float = 0.0
    window_bytes: float = 0.0
    next_tick: float = 0.0  # the background sync timer
    tick_syncs: int = 1
    total_time_ms: int | None = None
    downtime_ms: int | None = None
