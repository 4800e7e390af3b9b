"""When a migration whose source still answers is stuck: the stall timers, as pure decisions.

The port polls QEMU's progress and hands each answer to ``Watchdog.observe`` with the time it
read; a reason back means asking again cannot help (the machine rolls back before postcopy,
recovers the stream in it). No I/O and no clock: the timers are the watchdog's only state.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmotion.api.migration import MigrationStats
from qmotion.api.migration import QemuMigrationStatus as Qs

STALL_TIMEOUT_S = 30.0  # an active migration that moves no data for this long is abandoned
# Where bytes must keep moving: a stream set up over a dead link (a TLS handshake that never
# completes) stays in setup as surely as a copy stalls in active. ``none`` once migrate was
# issued: the source has no such migration (its figures are asked for by the id).
MOVING = frozenset({Qs.SETUP, Qs.ACTIVE, Qs.NONE})
# In postcopy the destination's vCPUs wait on pages that do not come: a stream that moves
# nothing for this long is paused and resumed (a dead link is noticed by TCP only in minutes).
POSTCOPY_STALL_S = 5.0
POSTCOPY_RECOVER_S = 20.0  # a reconnection that has not completed by then is retried
RECOVERING = frozenset({Qs.POSTCOPY_RECOVER_SETUP, Qs.POSTCOPY_RECOVER})
# A source at pre-switchover this long has lost the watcher that lets it go on (its agent
# restarted or died): the guest is paused there, so the migration is abandoned.
PRE_SWITCHOVER_STUCK_S = 30.0
# The guest is paused on the source while QEMU sends the device state: a link that dies then
# would hold it paused until TCP gives up (~15 min). The device state takes milliseconds.
DEVICE_STUCK_S = 10.0


@dataclass
class Watchdog:
    """The stall timers of one migration. ``progress_at``: when its stream last moved, or
    was last given a fresh start (created, or a postcopy stream reconnected)."""

    progress_at: float
    last_transferred: int = -1
    recovering_since: float | None = None
    pre_switchover_since: float | None = None
    device_since: float | None = None
    # The switchover status the watchdog gave up on (a rollback cancels it without waiting).
    stuck_in: Qs | None = None

    def observe(self, stats: MigrationStats, now: float) -> str | None:
        """One progress answer read at ``now``: why the migration is stuck, or None."""
        status = stats.status
        recovering = status in RECOVERING
        if not recovering:
            self.recovering_since = None
        elif self.recovering_since is None:
            self.recovering_since = now
        elif now - self.recovering_since > POSTCOPY_RECOVER_S:
            # A reconnection stuck (a handshake on a half-dead link): ended and tried again.
            self.recovering_since = None
            return f"the postcopy stream is still {status} after {POSTCOPY_RECOVER_S:.0f} s"
        if recovering:
            pass
        elif status == Qs.POSTCOPY_ACTIVE:
            if stats.transferred != self.last_transferred:
                self.last_transferred, self.progress_at = stats.transferred, now
            elif now - self.progress_at > POSTCOPY_STALL_S:
                self.progress_at = now  # one recovery per stall
                return f"the postcopy stream moved nothing for {POSTCOPY_STALL_S:.0f} s"
        elif stats.transferred != self.last_transferred or status not in MOVING:
            self.last_transferred, self.progress_at = stats.transferred, now
        elif now - self.progress_at > STALL_TIMEOUT_S:
            return f"no data moved for {STALL_TIMEOUT_S:.0f} s"
        if status != Qs.PRE_SWITCHOVER:
            self.pre_switchover_since = None
        elif self.pre_switchover_since is None:
            self.pre_switchover_since = now
        elif now - self.pre_switchover_since > PRE_SWITCHOVER_STUCK_S:
            self.stuck_in = status
            return (
                f"the source has held the guest paused at pre-switchover for "
                f"{PRE_SWITCHOVER_STUCK_S:.0f} s"
            )
        if status != Qs.DEVICE:
            self.device_since = None
        elif self.device_since is None:
            self.device_since = now
        elif now - self.device_since > DEVICE_STUCK_S:
            self.stuck_in = status
            return f"the device state has not gone through for {DEVICE_STUCK_S:.0f} s"
        return None

    def recovered(self, now: float) -> None:
        """A postcopy stream reconnected: it gets a fresh start."""
        self.progress_at = now
