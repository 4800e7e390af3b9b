"""The real manager as the campaign runs it: its parts wired as ``create_app`` wires them, over
the campaign world's agents and on the simulated clock, and a process that can die and start
again on the same database.

Differences from ``qmotion.server.http.app.create_app``, and why: the task runner is given
the simulated clock and sleep (the manager's timeouts in simulated time); the refresh loop
(every ``REFRESH_INTERVAL_S``: host facts, then a reconcile round) feeds DRS no measured
demand, and a host is never marked down (both read the wall clock, which would make a run
depend on how fast the machine is): DRS then plans on the VMs' memory and its rules. The DRS
and schedule loops are not run (the campaign applies DRS itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from sqlalchemy.orm import Session

from qmotion.api.drs import SettingsSet
from qmotion.server.automation.drs import ClusterDrs
from qmotion.server.automation.maintenance import Maintenance
from qmotion.server.automation.operations import Operations
from qmotion.server.db import ACTIVE_TASK_STATES, Database, Task
from qmotion.server.http.app import REFRESH_INTERVAL_S
from qmotion.server.inventory import Inventory
from qmotion.server.reconciler import Reconciler
from qmotion.server.tasks.runner import TaskRunner
from tests.unit.campaign.world import CampaignWorld, ManagerCrashed

log = logging.getLogger(__name__)
NEVER_DOWN_S = 86400


class MortalDatabase(Database):
    """The manager's database, until the manager dies: then nothing of it reaches the file."""

    dead = False

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        if self.dead:
            raise ManagerCrashed("the manager is dead")
        with super().session() as s:
            yield s


class Manager:
    """One manager process (``generation``) over ``url``'s database."""

    def __init__(self, world: CampaignWorld, url: str, generation: int) -> None:
        self.world, self.generation = world, generation
        self.db = MortalDatabase(url)
        self.inventory = Inventory(self.db, world.connector_of(generation))
        self.runner = TaskRunner(
            self.db, self.inventory, clock=world.clock.monotonic, sleep=world.sleep
        )
        self.ops = Operations(self.db, self.runner)
        self.drs = ClusterDrs(self.db, self.inventory, self.ops)
        self.maintenance = Maintenance(self.db, self.runner, self.drs, self.ops)
        self.reconciler = Reconciler(self.inventory)
        self.dead = False
        self._refresher: asyncio.Task[None] | None = None

    def configure(self) -> None:
        """Once, on a new cluster: DRS moves at once and again (no cool-down)."""
        values = {"drs.cooldown": "0s", "host.down-grace": f"{NEVER_DOWN_S}s"}
        self.drs.config.set_settings(SettingsSet(values=values))

    def start(self) -> None:
        """As the app's start: tasks a previous process left are recovered, its refresh loop
        runs. Call from within the event loop."""
        self.runner.recover_after_restart()
        self.drs.recover_after_restart()
        self.maintenance.resume_after_restart()
        self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # the refresher must outlive one bad round
                log.exception("host refresh failed")

    def refresh(self) -> None:
        """One refresh round: the hosts' facts, then reconcile."""
        self.inventory.refresh_hosts(NEVER_DOWN_S)
        self.reconciler.run()

    def kill(self, spare: set[asyncio.Task[object]]) -> None:
        """SIGKILL: its database and agents are out of its reach from now on, and every task
        of it stops at its next await (``spare``: the campaign's own tasks)."""
        self.dead = True
        self.db.dead = True
        self.world.dead.add(self.generation)
        for task in asyncio.all_tasks():
            if task not in spare:
                task.cancel()

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        self.db.engine.dispose()

    def busy(self) -> bool:
        """A task of this manager is under way (or one left behind is still active)."""
        if self.runner._running:
            return True
        with self.db.session() as s:
            return s.query(Task).filter(Task.state.in_(ACTIVE_TASK_STATES)).first() is not None
