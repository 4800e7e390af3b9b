"""The hosts behind the scripted agents: each VM's QEMU state, and QEMU's pre-copy over time.

QEMU's part, from migration/ram.c, migration.c and cpu-throttle.c:

- the first pass sends the guest's resident memory; each later pass sends what the dirty log
  held at the last bitmap sync (``remaining``), while the guest dirties more;
- a sync (``dirty-sync-count``) happens when what is left drops under the switchover
  threshold (the measured rate times ``downtime-limit``); if what the sync finds is still
  under it, QEMU switches over. Also, with auto-converge, at least every 5 s (QEMU >= 9.2);
- auto-converge throttles only at syncs at least 1 s apart: when the period dirtied more than
  ``throttle-trigger-threshold`` % of what it sent, twice, the throttle starts at
  ``cpu-throttle-initial`` or, once running, rises by ``cpu-throttle-increment`` (up to 99).
  Changing ``cpu-throttle-initial`` later does not move a running throttle. The throttle slows
  the vCPUs: the guest's sweep and hot set, not what device emulation (``dma_bytes``) writes;
- the throttle stops when the migration ends (completed, failed or cancelled);
- ``mbps`` and ``expected-downtime`` are measured over 100 ms windows, ``dirty-pages-rate``
  over the (>= 1 s) throttle period; the switchover threshold uses the measured rate;
- a destination QEMU that goes away fails the source's migration (the source runs on);
- xbzrle is accepted and recorded; its compression is not modelled (a hot set costs full
  pages: the pessimistic bound).

The agents' part of issue 22's contract (docs: /tmp/contract-22.md, qmotion.agent's
``migration_record``, ``finish`` and ``confirm``): each VM keeps its migration record
(``FakeVm.outgoing``/``incoming``, on disk: it survives ``restart_agent``); a destination made
for a migration with an id starts paused (``-S``) and runs only on the word (``finish``), which
the source agent gives itself when its QEMU completes (``_arrive``) and the manager gives
again; in postcopy the destination runs by itself. An agent that is ``down`` answers nothing,
gives no word and receives none; one that is only ``unreachable`` (from the manager) does.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from qmotion.api.host import HostMetrics, VmMetrics
from qmotion.api.migration import MigrationParams, MigrationStats
from qmotion.api.vm import Disk, VmInfo, VmSpec, VmState
from qmotion.server.db import utcnow
from tests.unit.agent_world.qemu import (
    BG_SYNC_S,
    BUFFER_DELAY_S,
    FINISHED,
    GUEST_BYTES,
    HOT_ROUND_S,
    PAGE,
    STEP_S,
    THROTTLE_PERIOD_S,
    FakeQemu,
    Guest,
    Link,
    Precopy,
    SimClock,
)
from tests.unit.agent_world.wire import _facts


@dataclass
class OutRecord:
    """The source's record of its last outgoing migration (written before migrate)."""

    id: str | None
    uri: str
    postcopy: bool = False  # the stream entered postcopy: this copy is never resumed


@dataclass
class InRecord:
    """The destination's record of the migration it arrives by, until confirmed."""

    id: str | None
    start: str = "auto"  # paused: QEMU runs only on the word (-S)
    finish: bool = False  # the word came (acted on once the stream is loaded)
    ran: bool = False  # the guest ran here: never torn down as a failed destination


@dataclass
class MoveRecord:
    """A storage move's record (the agent's storage-move.json: it survives a restart)."""

    datastore: str
    phase: str  # mirroring, ready, switching, pivoted, failed
    targets: dict[int, Disk]  # each moving disk's new file, by index
    sources: dict[int, Disk]  # and its old one
    copy_mode: str = "background"
    polls: int = 0
    error: str | None = None


@dataclass
class FakeVm:
    spec: VmSpec
    runstate: str  # QEMU's: running, inmigrate, postmigrate, paused; gone: QEMU exited
    migration: str = "none"  # QEMU's migration status on this side
    transferred: int = 0
    polls: int = 0
    started: float = 0.0
    qemu: FakeQemu = field(default_factory=FakeQemu)
    precopy: Precopy | None = None  # an outgoing migration of a scripted guest
    # Shared-nothing. Source: the disk mirror's phase (None, mirroring, ready, completed) and
    # polls; destination: the disks its incoming migration created (removed with it, until
    # the manager says they are the VM's).
    mirror: str | None = None
    mirror_polls: int = 0
    owned: list[str] = field(default_factory=list)
    held: bool = False  # a cold migration's hold: not started until released
    # The agent's migration record (on disk: an agent restart keeps it).
    outgoing: OutRecord | None = None
    incoming: InRecord | None = None
    arrived: str | None = None  # the confirmed arrival's id: its figures are still its
    # The source agent's memory of its stream (lost when the agent restarts): that it follows
    # one, whether its watcher gives the paused destination the word, and how that went.
    follows: bool = False
    gives_word: bool = False
    finish_ms: float | None = None
    finish_error: str | None = None
    storage_move: MoveRecord | None = None  # on disk, like the migration record

    @property
    def current(self) -> str | None:
        """The migration this QEMU's figures belong to (the record's id)."""
        if self.outgoing is not None:
            return self.outgoing.id
        return self.incoming.id if self.incoming is not None else self.arrived

    def run_here(self) -> None:
        """The guest runs on this QEMU; an arrival's record says so first (as the agent
        writes it before its cont, or as it sees QEMU resume by itself)."""
        if self.incoming is not None:
            self.incoming.ran = True
        self.runstate = "running"

    def outgoing_status(self) -> str:
        """QEMU's status of the recorded outgoing migration as the agent reads it: completed
        only in postmigrate (agent.vms.migration_record.outgoing_status)."""
        if self.migration != "completed" or self.runstate == "postmigrate":
            return self.migration
        return "device" if self.runstate == "finish-migrate" else "failed"


@dataclass
class Cluster:
    """Two or more hosts' VMs and their QEMUs, behind one lock (the agents' handlers run in
    threads). Its underscored methods are this package's own: the agent's routes (agent.py,
    migrations.py, nbd.py) call them."""

    hosts: tuple[str, ...] = ("h1", "h2")
    polls_to_complete: int = 3  # progress queries before QEMU completes on its own
    duration_s: float = 0.0  # and at least this long after migrate was issued
    vms: dict[str, dict[str, FakeVm]] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)  # the manager cannot reach its agent
    # Agents not running: nothing answers, their watchers act on nothing (restart_agent).
    down: set[str] = field(default_factory=set)
    # Migration addresses that do not answer (as a network that is down): probes skip them.
    dead_addresses: set[str] = field(default_factory=set)
    uris: list[tuple[str, str]] = field(default_factory=list)  # (source host, stream URI)
    max_active_per_host: dict[str, int] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Convergence: scripted guests (by VM name), the path, and simulated time.
    guests: dict[str, Guest] = field(default_factory=dict)
    link: Link = field(default_factory=Link)
    clock: SimClock = field(default_factory=SimClock)
    # What the agents received (host, kind, params) and told their QEMU (host, vm, command, args).
    params_received: list[tuple[str, str, MigrationParams]] = field(default_factory=list)
    qmp: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    # Disk files per host ("datastore:path"), for shared-nothing migrations.
    files: dict[str, set[str]] = field(default_factory=dict)
    # Host facts beyond the defaults (cpus, memory_bytes, ...), and each VM's CPU load (% of
    # one CPU) as the agents' metrics report it.
    facts_override: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    dirty_rate: dict[str, float] = field(default_factory=dict)  # MiB/s, once measured

    def __post_init__(self) -> None:
        for h in self.hosts:
            self.vms.setdefault(h, {})
            self.files.setdefault(h, set())

    def disks_present(self, host: str, vm: str) -> bool:
        """Every disk the VM's definition on ``host`` names exists there."""
        v = self.vms[host][vm]
        return all(f"{d.datastore}:{d.path}" in self.files[host] for d in v.spec.disks)

    # ---------------------------------------------------------------- what tests look at

    def running_copies(self, vm: str) -> list[str]:
        return [h for h in self.hosts if self._state(h, vm) == "running"]

    def _state(self, host: str, vm: str) -> str | None:
        v = self.vms[host].get(vm)
        return v.runstate if v else None

    def tunes(self, host: str, vm: str) -> list[dict[str, Any]]:
        """The migrate-set-parameters QEMU accepted on ``host`` once ``vm``'s migration ran."""
        out, migrating = [], False
        for h, name, cmd, args in self.qmp:
            if h == host and name == vm:
                migrating = migrating or cmd == "migrate"
                if migrating and cmd == "migrate-set-parameters":
                    out.append(args)
        return out

    def complete(self, vm: str) -> bool:
        """QEMU's switchover: possible only while the source's migration is active (or in
        postcopy, whose end it then is)."""
        with self.lock:
            src = next((h for h in self.hosts if self._sending(self.vms[h].get(vm))), None)
            dst = self._destination_host(vm, src)
            if src is None or dst is None:
                return False
            s, d = self.vms[src][vm], self.vms[dst][vm]
            if s.mirror is not None:
                if s.mirror != "ready":
                    # The source agent cancels at pre-switchover: not in sync.
                    s.migration, d.runstate = "cancelled", "gone"
                    return False
                s.mirror = "completed"  # ended in sync before the device state left
            if s.precopy is not None:
                self._switchover(s, s.precopy)
                return True
            s.migration, s.runstate, s.transferred = "completed", "postmigrate", GUEST_BYTES
            self._arrive(src, s, dst, d)
            return True

    @staticmethod
    def _sending(v: FakeVm | None) -> bool:
        """This QEMU sends a stream that may complete now."""
        if v is None:
            return False
        return v.migration == "active" or (
            v.outgoing is not None and v.migration == "postcopy-active"
        )

    def _arrive(self, src: str, s: FakeVm, dst: str, d: FakeVm) -> None:
        """The stream completed: the destination's QEMU loaded it. Paused (-S) it waits for
        the word, which the source agent's watcher gives now (its QEMU is in postmigrate)."""
        d.migration = "completed"
        inc = d.incoming
        if inc is None or inc.start != "paused":
            d.run_here()  # QEMU runs it by itself
            return
        if d.runstate == "inmigrate":
            d.runstate = "paused"
        if inc.finish and dst not in self.down:
            d.run_here()  # the word came earlier: its watcher acts now
        if not s.gives_word or src in self.down:
            return
        if dst in self.down:
            s.finish_error = f"the destination agent on {dst} does not answer"
        elif inc.id != (s.outgoing.id if s.outgoing else None):
            s.finish_error = f"{dst}: not the destination of this migration"
        else:
            inc.finish = True
            d.run_here()
            s.finish_ms = 1.0

    def _destination_host(self, vm: str, src: str | None) -> str | None:
        """The host whose QEMU receives ``vm``'s stream: loading it, or in postcopy. A stream
        with an id reaches only that migration's destination (another migration's listens
        on another port)."""
        out = self.vms[src][vm].outgoing if src is not None and vm in self.vms[src] else None
        for h in self.hosts:
            v = self.vms[h].get(vm)
            if h == src or v is None:
                continue
            if (
                out is not None
                and out.id is not None
                and (v.incoming is None or v.incoming.id != out.id)
            ):
                continue
            if v.runstate == "inmigrate" or (
                v.incoming is not None and v.migration.startswith("postcopy")
            ):
                return h
        return None

    def restart_agent(self, host: str) -> None:
        """The host's agent starts (again): what it kept in memory is gone, its records and
        its QEMUs are not; a paused destination told to run whose stream is loaded (or in
        postcopy) runs now (agent.migration.finish.settle_after_restart)."""
        with self.lock:
            self.down.discard(host)
            for v in self.vms[host].values():
                v.gives_word, v.finish_ms, v.finish_error = False, None, None
                v.follows = False
                inc = v.incoming
                if inc is None or inc.start != "paused" or v.runstate != "paused":
                    continue
                if (v.migration == "completed" and inc.finish) or v.migration.startswith(
                    "postcopy"
                ):
                    v.run_here()

    def _observe(self) -> None:
        """Migrations each host takes part in now, as its agent would report them."""
        for h in self.hosts:
            n = sum(
                1
                for v in self.vms[h].values()
                if v.migration in ("active", "device", "cancelling", "postcopy-active")
                or v.runstate == "inmigrate"
            )
            self.max_active_per_host[h] = max(self.max_active_per_host.get(h, 0), n)

    # ---------------------------------------------------------------- what the agents do to QEMU

    def _settle_cancel(self, name: str, vm: FakeVm) -> None:
        vm.migration = "cancelled"
        vm.qemu.throttle_pct = 0
        if vm.runstate == "finish-migrate":
            vm.runstate = "running"  # QEMU resumes the guest it paused for the switchover
        # The destination's incoming migration fails with the stream: its QEMU exits (that
        # migration's only: another one's listens on another port).
        mid = vm.outgoing.id if vm.outgoing is not None else None
        for h in self.hosts:
            other = self.vms[h].get(name)
            ours = other is not None and (
                mid is None or (other.incoming is not None and other.incoming.id == mid)
            )
            if other is not None and ours and other.runstate == "inmigrate":
                other.runstate = "gone"

    def _qmp(self, host: str, vm: str, command: str, args: dict[str, Any]) -> None:
        self.qmp.append((host, vm, command, args))

    # ---------------------------------------------------------------- QEMU's pre-copy

    def _wait(self, vm: FakeVm, req: httpx.Request) -> None:
        """Migrations.stats: with ``wait_ms``, wait for a status other than ``known_status``."""
        wait_ms = int(req.url.params.get("wait_ms", "0"))
        known = req.url.params.get("known_status")
        if wait_ms <= 0 or vm.migration != known or known in FINISHED:
            return
        deadline = self.clock.t + wait_ms / 1000
        while vm.migration == known and self.clock.t < deadline - 1e-9:
            self._tick(min(STEP_S, deadline - self.clock.t))

    def _tick(self, seconds: float) -> None:
        """Simulated time passes: every scripted migration under way progresses."""
        steps = max(1, math.ceil(seconds / STEP_S - 1e-9))
        dt = seconds / steps
        for _ in range(steps):
            self.clock.t += dt
            for here in self.vms.values():
                for vm in list(here.values()):
                    if vm.precopy is not None and vm.migration == "active":
                        self._step(vm, vm.precopy, dt)

    def _step(self, vm: FakeVm, p: Precopy, dt: float) -> None:
        now = self.clock.t
        if self._destination(vm.spec.name) is None:
            # The stream's other end is gone: QEMU's migration fails, the source runs on.
            vm.migration, vm.qemu.throttle_pct = "failed", 0
            return
        guest = self.guests[vm.spec.name]
        running = dt * (1 - vm.qemu.throttle_pct / 100)
        p.swept += guest.sweep_bps * running
        p.cpu_s += running
        p.wall_s += dt
        rate = min(self.link.bandwidth_bps, float(vm.qemu.params["max-bandwidth"]))
        sent = min(rate * dt, p.bitmap)
        if p.bitmap > 0:
            # Pages go out in address order: each region drains in proportion.
            left = 1 - sent / p.bitmap
            p.bitmap_hot *= left
            p.bitmap_dma *= left
        p.bitmap -= sent
        p.transferred += sent
        p.window_bytes += sent
        if now - p.window_start >= BUFFER_DELAY_S - 1e-9:
            # migration_update_counters
            p.mbps = p.window_bytes * 8 / (now - p.window_start) / 1e6
            per_ms = p.window_bytes / ((now - p.window_start) * 1000)
            if p.dirty_pages_rate and p.transferred > 10000 and per_ms > 0:
                p.expected_downtime_ms = round(p.dirty_bytes_last_sync / per_ms)
            p.window_start, p.window_bytes = now, 0.0
        if vm.qemu.caps["auto-converge"] and now >= p.next_tick:
            # cpu_throttle_dirty_sync_timer_tick: no sync since the last tick, sync now.
            if p.syncs > 1 and p.syncs == p.tick_syncs:
                self._sync(vm, p)
            p.tick_syncs, p.next_tick = p.syncs, p.next_tick + BG_SYNC_S
        # migration_iteration_run: under the threshold, sync; still under it, switch over.
        threshold = p.mbps * 1e6 / 8 * vm.qemu.params["downtime-limit"] / 1000
        if p.bitmap < threshold:
            self._sync(vm, p)
            if p.bitmap < threshold:
                self._switchover(vm, p)

    def _sync(self, vm: FakeVm, p: Precopy) -> None:
        """migration_bitmap_sync: the dirty log into the bitmap; once a second, the rates and
        auto-converge's trigger."""
        guest = self.guests[vm.spec.name]
        hot = max(p.bitmap_hot, guest.hot_bytes * min(1.0, p.cpu_s / HOT_ROUND_S))
        dma = max(p.bitmap_dma, guest.dma_bytes * min(1.0, p.wall_s / HOT_ROUND_S))
        sweep_room = max(p.resident - guest.hot_bytes - guest.dma_bytes, 0)
        swept = min(p.bitmap - p.bitmap_hot - p.bitmap_dma + p.swept, sweep_room)
        new = max(0.0, hot + dma + swept - p.bitmap)
        p.bitmap, p.bitmap_hot, p.bitmap_dma = hot + dma + swept, hot, dma
        p.dirty_bytes_last_sync = p.bitmap
        p.swept = p.cpu_s = p.wall_s = 0.0
        p.syncs += 1
        p.period_dirty += new
        now = self.clock.t
        if now > p.period_start + THROTTLE_PERIOD_S:
            xfer = p.transferred - p.xfer_prev
            threshold = vm.qemu.params["throttle-trigger-threshold"]
            if p.period_dirty > xfer * threshold / 100:
                p.high += 1
                if p.high >= 2:
                    p.high = 0
                    if vm.qemu.caps["auto-converge"]:
                        q = vm.qemu
                        q.throttle_pct = (
                            min(
                                q.throttle_pct + q.params["cpu-throttle-increment"],
                                q.params["max-cpu-throttle"],
                            )
                            if q.throttle_pct
                            else q.params["cpu-throttle-initial"]
                        )
            p.dirty_pages_rate = int(p.period_dirty / PAGE / (now - p.period_start))
            p.period_start, p.period_dirty, p.xfer_prev = now, 0.0, p.transferred

    def _switchover(self, vm: FakeVm, p: Precopy) -> None:
        rate = max(p.mbps * 1e6 / 8, 1.0)
        p.downtime_ms = round(p.bitmap / rate * 1000 + self.link.rtt_ms)
        p.transferred += p.bitmap
        p.bitmap = 0.0
        p.total_time_ms = round((self.clock.t - p.started) * 1000)
        vm.migration, vm.runstate, vm.qemu.throttle_pct = "completed", "postmigrate", 0
        vm.transferred = int(p.transferred)
        src = next(h for h in self.hosts if self.vms[h].get(vm.spec.name) is vm)
        dst = self._destination_host(vm.spec.name, src)
        if dst is not None:
            self._arrive(src, vm, dst, self.vms[dst][vm.spec.name])

    def _stream_lost(self, name: str, dst: FakeVm) -> None:
        """``dst``'s QEMU went away while it received a stream: the source's migration fails
        (the connection resets) and its guest runs on there."""
        for here in self.vms.values():
            s = here.get(name)
            if s is None or not self._sending(s) or s.migration.startswith("postcopy"):
                continue
            out, inc = s.outgoing, dst.incoming
            if out is None or inc is None or out.id == inc.id:
                s.migration, s.qemu.throttle_pct = "failed", 0

    def _destination(self, name: str) -> FakeVm | None:
        for h in self.hosts:
            v = self.vms[h].get(name)
            if v is not None and v.runstate == "inmigrate":
                return v
        return None

    def _stats(self, vm: FakeVm) -> dict[str, Any]:
        p = vm.precopy
        if p is not None:
            stats = MigrationStats(
                status=vm.migration,
                transferred=int(p.transferred),
                remaining=int(p.bitmap),
                total=p.memory,
                mbps=round(p.mbps, 3),
                dirty_pages_rate=p.dirty_pages_rate,
                page_size=PAGE,
                passes=p.syncs,
                throttle_pct=vm.qemu.throttle_pct,
                expected_downtime_ms=p.expected_downtime_ms if vm.migration == "active" else None,
                total_time_ms=p.total_time_ms,
                downtime_ms=p.downtime_ms,
                setup_time_ms=2,
                migration_id=vm.current,
                finish_ms=vm.finish_ms,
                finish_error=vm.finish_error,
            )
            return stats.model_dump(mode="json")
        done = vm.migration == "completed"
        stats = MigrationStats(
            status=vm.migration,
            transferred=vm.transferred,
            remaining=GUEST_BYTES - vm.transferred,
            total=GUEST_BYTES,
            total_time_ms=300 if done else None,
            downtime_ms=5 if done else None,
            setup_time_ms=2 if vm.migration != "none" else None,
            migration_id=vm.current,
            finish_ms=vm.finish_ms,
            finish_error=vm.finish_error,
        )
        return stats.model_dump(mode="json")

    def _info(self, host: str, vm: FakeVm) -> VmInfo:
        state = {
            "running": VmState.RUNNING,
            "inmigrate": VmState.PAUSED,
            "postmigrate": VmState.PAUSED,
            "finish-migrate": VmState.PAUSED,
            "paused": VmState.PAUSED,
        }.get(vm.runstate, VmState.STOPPED)
        return VmInfo(
            name=vm.spec.name,
            uuid=vm.spec.uuid,
            host=host,
            state=state,
            qemu_status=vm.runstate,
            spec=vm.spec,
            incoming_migration=vm.incoming.id if vm.incoming is not None else None,
            outgoing_migration=vm.outgoing.id if vm.outgoing is not None else None,
            outgoing_status=vm.outgoing_status() if vm.outgoing is not None else None,
        )

    def host_facts(self, host: str) -> dict[str, Any]:
        return {**_facts(), "name": host, **self.facts_override.get(host, {})}

    def _metrics(self, host: str) -> dict[str, Any]:
        """The agent's usage sample: each VM with a QEMU (running, paused, incoming or
        migrated away, as the agent samples every QEMU process) at its scripted CPU load when
        it runs, idle otherwise."""
        vms = [
            VmMetrics(
                name=name,
                cpu_percent=self.cpu_percent.get(name, 0.0) if v.runstate == "running" else 0.0,
                rss_bytes=v.spec.memory << 20,
                memory_mib=v.spec.memory,
                dirty_rate_mib_s=self.dirty_rate.get(name),
            )
            for name, v in self.vms[host].items()
            if v.runstate != "gone"
        ]
        facts = self.host_facts(host)
        return HostMetrics(
            sampled_at=utcnow(),
            cpus=facts["cpus"],
            cpu_percent=0.0,
            memory_total_bytes=facts["memory_bytes"],
            memory_available_bytes=facts["memory_bytes"],
            vms_memory_mib=sum(v.memory_mib for v in vms),
            vms=vms,
        ).model_dump(mode="json")
