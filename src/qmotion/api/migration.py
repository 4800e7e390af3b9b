"""Wire models of live migration between agents: parameters, requests and progress."""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from qmotion.api.storage import DiskCopyPlan, DiskFormat, NbdTargets
from qmotion.api.vm import NAME_PATTERN, StrictModel, VmSpec

UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: QEMU's default cap is 128 MiB/s; this lifts it
# A live migration's id (uuid4 hex), made by the manager: every agent call of that migration
# carries it, and an agent answers for that migration only (docs/migration.md).
MIGRATION_ID_PATTERN = r"^[0-9a-f]{32}$"
MigrationId = Annotated[str, Field(pattern=MIGRATION_ID_PATTERN)]
# paused: the destination QEMU starts with -S and runs only on the word that the source
# completed (safe); auto: QEMU runs it by itself when the stream completes (QEMU's
# cancel-at-completion race can then leave two running copies; kept for measurement only).
DestinationStart = Literal["paused", "auto"]


class QemuMigrationStatus(StrEnum):
    """QEMU's MigrationStatus (qapi/migration.json), as query-migrate and events report it."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset(
    {QemuMigrationStatus.COMPLETED, QemuMigrationStatus.FAILED, QemuMigrationStatus.CANCELLED}
)


class MigrationPhase(StrEnum):
    """Where a migration task stands: the state machines' phases (qmotion.migration.machine,
    qmotion.migration.storage) plus ``queued`` (waiting for a per-host slot)."""

    QUEUED = "queued"
    PENDING = "pending"
    PRECHECK = "precheck"
    PREPARE = "prepare_destination"
    START = "start_migration"
    MONITOR = "monitor"
    VERIFY = "verify_destination"
    ANNOUNCE = "announce"
    STOP_SOURCE = "stop_source"
    UPDATE = "update_inventory"
    ROLLBACK = "rollback"
    # Terminal: the destination runs the VM (the inventory says so) but what follows the
    # switchover (announce, the source's release) could not be confirmed; reconcile ends it.
    CONFIRM_PENDING = "confirmation_pending"
    RECOVER = "recover"
    # A storage move's (qmotion.migration.storage)
    START_MIRROR = "start_mirror"
    MIRROR = "mirror"
    PIVOT = "pivot"
    PIVOT_CHECK = "pivot_check"
    RELEASE = "release_old_disks"
    # A cold migration's (qmotion.migration.cold)
    EXPORT_DISKS = "export_disks"
    COPY_DISKS = "copy_disks"
    DEFINE_DESTINATION = "define_destination"
    REMOVE_SOURCE = "remove_source"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MigrationParams(StrictModel):
    """What QEMU is told on both sides. Defaults are chosen from measurement (see migration/)."""

    max_bandwidth: int = Field(default=UNLIMITED_BANDWIDTH, gt=0, description="bytes/s")
    downtime_limit_ms: int = Field(default=20, ge=1, le=60_000)
    multifd_channels: int = Field(default=0, ge=0, le=16, description="0: one classic stream")
    multifd_compression: Literal["zstd"] | None = Field(
        default=None,
        description="multifd only: zstd (level 1) packs each packet's pages into one buffer, "
        "so a TLS stream writes records of 16 KiB instead of one per 4 KiB page; none: off "
        "(left out when off, so an agent from before it accepts the request)",
    )
    pause_before_switchover: bool = False
    steer: bool = True
    forward: bool = Field(default=True, description="replay frames that reach the source late")
    auto_converge: bool = Field(
        default=False, description="armed at the start, dormant until the ladder throttles"
    )
    throttle_initial_pct: int = Field(
        default=0, ge=0, le=99, description="auto-converge throttling from the start; 0: dormant"
    )
    throttle_increment_pct: int = Field(
        default=0, ge=0, le=99, description="QEMU's step per pass; 0: qmotion's (20)"
    )
    xbzrle_cache_bytes: int = Field(default=0, ge=0, le=1 << 40, description="0: xbzrle off")
    tls: bool = Field(default=False, description="mutual x509 TLS on the stream")
    postcopy: bool = Field(
        default=False,
        description="postcopy-ram armed on both ends (one stream: QEMU does not combine it "
        "with multifd); the ladder may switch to it",
    )
    tls_hostname: str | None = Field(
        default=None, max_length=253, description="source: the name the destination's cert has"
    )
    # The manager's, for the ladder; agents ignore them.
    max_downtime_ms: int | None = Field(default=None, ge=1, le=60_000)
    timeout_s: float | None = Field(default=None, gt=0)
    # The manager's: shared-nothing (the disks are copied to this datastore of the destination).
    copy_datastore: str | None = Field(default=None, max_length=64)
    copy_format: DiskFormat | None = None
    destination_start: DestinationStart = Field(
        default="paused",
        description="paused: the destination runs only on the word that the source completed",
    )


class MigrationTune(StrictModel):
    """A change to a running migration: the ladder's next rung."""

    downtime_limit_ms: int | None = Field(default=None, ge=1, le=60_000)
    throttle_pct: int | None = Field(
        default=None, ge=1, le=99, description="wake auto-converge at this initial throttle"
    )
    start_postcopy: bool = Field(
        default=False, description="switch to postcopy now (the destination runs the VM)"
    )


class PostcopyRecovery(StrictModel):
    """Resuming a postcopy migration whose stream broke: the destination listens again
    (``uri`` empty: on the address it listened on before), the source reconnects there."""

    uri: str | None = Field(default=None, max_length=300, description="tcp:ADDRESS:PORT")


class DirtyRateRequest(StrictModel):
    seconds: list[Annotated[float, Field(ge=0.1, le=10.0)]] = Field(
        default=[0.5, 1.5], min_length=1, max_length=3, description="one sample per length"
    )


class DirtyRateSample(BaseModel):
    seconds: float
    dirtied_bytes: int


class DirtyRateReport(BaseModel):
    """QMP calc-dirty-rate over samples of different lengths, and the guest's resident RAM."""

    samples: list[DirtyRateSample]
    memory_bytes: int
    resident_bytes: int = Field(description="QEMU's RSS, bounded by the guest's memory")


class PeerRef(StrictModel):
    """How the source agent reaches the destination agent at switchover, directly."""

    url: str = Field(description="https: the peer's mutual-TLS port (no token then)")
    token: str | None = None
    vm: str


class PathProbeRequest(StrictModel):
    """Measure the path from this agent to a peer agent: RTT, then a timed upload.

    With ``candidates`` (the peer's migration addresses, preferred first), the first that
    answers is measured (at the peer URL's port) and the ones before it are reported."""

    peer: PeerRef
    seconds: float = Field(default=0.5, ge=0.05, le=5.0)
    max_bytes: int = Field(default=2 << 30, ge=1 << 20, le=16 << 30)
    candidates: list[IPv4Address] = Field(default_factory=list, max_length=8)
    upload: bool = Field(default=True, description="false: reachability and RTT only")


class PathProbe(BaseModel):
    rtt_ms: float
    bandwidth_bps: float
    bytes: int
    seconds: float
    address: str | None = Field(default=None, description="the candidate that answered")
    unreachable: list[str] = Field(
        default_factory=list, description="candidates tried before it, each with the reason"
    )
    local_ifname: str | None = Field(default=None, description="this end's interface to it")
    local_mtu: int | None = None


class IncomingRequest(StrictModel):
    spec: VmSpec
    migration_id: MigrationId | None = Field(
        default=None, description="the migration this destination is for (the manager's id)"
    )
    params: MigrationParams = Field(default_factory=MigrationParams)
    address: IPv4Address | None = Field(
        default=None, description="listen here (one of the host's migration addresses)"
    )
    copy_disks: DiskCopyPlan | None = Field(
        default=None, description="shared-nothing: create these disks empty and export them"
    )
    source_host: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="the source host's name: on a TLS cluster the only certificate the "
        "stream (and a shared-nothing disk copy) is taken from",
    )
    source: list[IPv4Address] = Field(
        default_factory=list,
        max_length=16,
        description="the source host's addresses: its peer-port calls about this VM (steer, "
        "finish) are taken from these only (empty: from any host of the cluster)",
    )


class StepTime(BaseModel):
    """One step of a migration's start, for its timeline: when it began (ms since the
    request was accepted, or since the agent's call began for an agent's own step) and how
    long it took. Steps may overlap (measuring runs beside preparing the destination)."""

    step: str
    start_ms: float
    ms: float


class IncomingResponse(BaseModel):
    uri: str = Field(description="on the preferred address")
    port: int | None = None
    addresses: list[str] = Field(
        default_factory=list, description="every address the stream may be sent to"
    )
    nbd: NbdTargets | None = Field(default=None, description="shared-nothing: the empty disks")
    steps: list[StepTime] = Field(
        default_factory=list, description="the destination agent's own steps in preparing"
    )


class OutgoingRequest(StrictModel):
    uri: str
    migration_id: MigrationId | None = Field(
        default=None, description="the migration this stream is (the manager's id)"
    )
    params: MigrationParams = Field(default_factory=MigrationParams)
    peer: PeerRef | None = None


class MigrationStats(BaseModel):
    """QEMU's query-migrate, flattened, plus what the agent saw happen at switchover."""

    status: QemuMigrationStatus
    migration_id: str | None = Field(
        default=None,
        description="the migration these figures belong to (asked for one: 'none' if not it)",
    )
    total_time_ms: int | None = None
    setup_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    mbps: float = 0.0
    dirty_pages_rate: int = 0
    page_size: int = 4096
    passes: int = 0
    throttle_pct: int = Field(default=0, description="auto-converge's current vCPU throttle")
    xbzrle_cache_miss_rate: float | None = None
    xbzrle_overflow: int | None = None
    error: str | None = None
    steer_ms: float | None = None
    steer_error: str | None = None
    finish_ms: float | None = Field(
        default=None, description="source STOP to the destination told to run (source agent)"
    )
    finish_error: str | None = Field(
        default=None, description="why the source agent could not tell the destination to run"
    )
    rung: str | None = Field(default=None, description="the convergence ladder's rung (manager)")
    downtime_limit_ms: int | None = Field(default=None, description="as last set (manager)")
    events: list[tuple[str, float]] = Field(
        default_factory=list, description="status changes, agent monotonic clock in ms"
    )
    started_at_ms: float | None = Field(
        default=None, description="agent monotonic clock when migrate was issued"
    )
    steps: list[StepTime] = Field(
        default_factory=list,
        description="the source agent's own steps in starting the stream (migrate's answer only)",
    )

    @classmethod
    def from_qmp(cls, q: dict[str, Any]) -> MigrationStats:
        ram = q.get("ram", {})
        xbzrle = q.get("xbzrle-cache", {})
        return cls(
            status=q.get("status", "none"),
            total_time_ms=q.get("total-time"),
            setup_time_ms=q.get("setup-time"),
            downtime_ms=q.get("downtime"),
            expected_downtime_ms=q.get("expected-downtime"),
            transferred=ram.get("transferred", 0),
            remaining=ram.get("remaining", 0),
            total=ram.get("total", 0),
            mbps=ram.get("mbps", 0.0),
            dirty_pages_rate=ram.get("dirty-pages-rate", 0),
            page_size=ram.get("page-size", 4096),
            passes=ram.get("dirty-sync-count", 0),
            throttle_pct=q.get("cpu-throttle-percentage", 0),
            xbzrle_cache_miss_rate=xbzrle.get("cache-miss-rate"),
            xbzrle_overflow=xbzrle.get("overflow"),
            error=q.get("error-desc"),
        )

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def dirty_bps(self) -> float:
        return float(self.dirty_pages_rate * self.page_size)

    @property
    def throughput_bps(self) -> float:
        return self.mbps * 1e6 / 8


class MigrationPrediction(BaseModel):
    """What a migration is expected to take, from measurements made just before it."""

    vm: str
    source: str
    destination: str
    memory_bytes: int
    resident_bytes: int = Field(description="what the first pass sends at most")
    dirty_rate_bps: float = Field(description="bytes the guest dirties in one second")
    hot_set_bytes: float = Field(description="rewritten within every sample")
    sweep_bps: float = Field(description="new pages dirtied per second")
    bandwidth_bps: float
    bandwidth_from: str = Field(description="probe, history (last migration) or operator cap")
    rtt_ms: float
    converges: bool
    total_s: float
    downtime_ms: float
    passes: int
    measures: list[str] = Field(description="the ladder's rungs the prediction needed")
    max_throttle_pct: int
    xbzrle: bool
    max_downtime_ms: int
    completion_timeout_s: float
    why_not: str | None = None
    migration_address: str | None = Field(
        default=None, description="the destination's address the stream goes to"
    )
    unreachable: list[str] = Field(
        default_factory=list, description="preferred addresses that did not answer, and why"
    )
    streams: int = Field(default=1, description="TCP streams (multifd channels, else 1)")


class FlightSample(BaseModel):
    """One progress sample of a running migration, as the manager saw it."""

    t_s: float = Field(description="seconds since migrate was issued")
    transferred: int
    remaining: int
    dirty_bps: float
    throughput_bps: float
    throttle_pct: int
    passes: int
    rung: str
    downtime_limit_ms: int


class Leftover(BaseModel):
    """Something a failed operation could not clean up, and why: recorded with its task."""

    host: str
    vm: str
    what: str
    why: str


class MigrationReport(BaseModel):
    """The result of a live-migration task: QEMU's own figures and what the manager measured
    around them. Times in milliseconds; None where the migration did not get that far."""

    outcome: MigrationPhase = Field(description="done, failed or cancelled")
    vm: str
    source: str
    destination: str
    total_ms: int | None = Field(default=None, description="QEMU: migrate issued to completion")
    downtime_ms: int | None = Field(default=None, description="QEMU: source stopped to resumed")
    setup_ms: int | None = None
    bytes: int | None = Field(default=None, description="RAM bytes sent")
    passes: int | None = Field(default=None, description="dirty-bitmap syncs (pre-copy passes)")
    throughput_mbps: float | None = None
    guest_paused_ms: float | None = Field(
        default=None, description="source STOP to destination RESUME, agents' clocks"
    )
    steer_ms: float | None = Field(default=None, description="destination took the traffic")
    finish_ms: float | None = Field(
        default=None, description="source STOP to the destination told to run (paused start)"
    )
    destination_start: DestinationStart | None = Field(
        default=None, description="paused (runs on the source's word) or auto (QEMU's own)"
    )
    guest_frame_ms: float | None = Field(
        default=None, description="source STOP to the guest's first frame on the destination"
    )
    client_frame_ms: float | None = Field(
        default=None, description="source STOP to the first frame delivered to it there"
    )
    steer_error: str | None = Field(
        default=None, description="why the switchover call to the destination failed"
    )
    source_stopped_at_ms: float | None = Field(
        default=None, description="the source's STOP (switchover began), its agent's clock"
    )
    orchestration_ms: float | None = Field(
        default=None, description="request accepted (after queueing) to migrate issued"
    )
    queued_ms: float | None = None
    wall_ms: float = Field(description="request accepted to task end")
    start_timeline: list[StepTime] = Field(
        default_factory=list,
        description="accepted -> stream started, step by step (the agents' steps prefixed "
        "'source: ' and 'destination: ')",
    )
    warnings: list[str] = Field(default_factory=list)
    migration_address: str | None = Field(
        default=None, description="the destination address the stream was sent to"
    )
    streams: int | None = Field(default=None, description="TCP streams the RAM went over")
    tls: bool | None = Field(default=None, description="the stream was TLS (mutual, x509)")
    disk_copy_ms: float | None = Field(
        default=None, description="shared-nothing: mirror start to every disk in sync"
    )
    disk_bytes: int | None = Field(default=None, description="shared-nothing: disk bytes copied")
    prediction: MigrationPrediction | None = None
    rungs: list[str] = Field(default_factory=list, description="the ladder's climb, in order")
    max_throttle_pct: int = 0
    throttled_s: float = Field(default=0.0, description="seconds the guest's vCPUs were slowed")
    postcopy_at_s: float | None = Field(
        default=None,
        description="seconds into the migration when the destination took over in postcopy",
    )
    postcopy_recoveries: int = Field(default=0, description="broken postcopy streams resumed")
    samples: list[FlightSample] = Field(default_factory=list)
    leftovers: list[Leftover] = Field(
        default_factory=list, description="what a failed migration could not clean up, and why"
    )


def switchover_at_s(r: MigrationReport) -> float | None:
    """Seconds after migrate was issued when the source stopped: QEMU's own figures (its
    total time ends with the downtime)."""
    if r.total_ms is None or r.downtime_ms is None:
        return None
    return (r.total_ms - r.downtime_ms) / 1000


def timeline(r: MigrationReport) -> list[tuple[str, float]]:
    """The switchover to the millisecond, from the source's stop (the agents' clocks)."""
    out: list[tuple[str, float]] = []
    if r.source_stopped_at_ms is None:
        return out
    out.append(("source stopped (QEMU STOP)", 0.0))
    if r.steer_ms is not None:
        out.append(("network steered to the destination", r.steer_ms))
    if r.downtime_ms is not None:
        out.append(("QEMU's downtime ends (source side)", float(r.downtime_ms)))
    if r.guest_paused_ms is not None:
        out.append(("destination resumed (QEMU RESUME)", r.guest_paused_ms))
    if r.guest_frame_ms is not None:
        out.append(("first frame from the guest on the destination", r.guest_frame_ms))
    if r.client_frame_ms is not None:
        out.append(("first client frame delivered to it there", r.client_frame_ms))
    return sorted(out, key=lambda x: x[1])


class SteerRequest(StrictModel):
    """Point the network at this host for a VM whose incoming migration is switching over."""

    mac: list[str] = Field(min_length=1)
