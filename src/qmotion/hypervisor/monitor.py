"""One VM's QMP monitor, through QEMU's own ``qemu.qmp`` library, with our error types."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, StateError

from qmotion.hypervisor.errors import QmpError, QmpUnavailable


class Monitor:
    """A connected QMP session. QEMU's socket serves one client at a time, so the agent keeps
    exactly one Monitor per running VM and shares it between requests."""

    def __init__(self, socket: Path, vm: str) -> None:
        self.socket = socket
        self.vm = vm
        self._qmp = QMPClient(vm)
        # The library's default listener would queue every event forever (it cannot be removed);
        # make it accept none, and subscribe explicitly where events matter.
        self._qmp.events.event_filter = lambda _event: False
        self._lock = asyncio.Lock()

    async def connect(self, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await self._qmp.connect(str(self.socket))
                return
            except (ConnectError, OSError) as exc:
                if asyncio.get_running_loop().time() >= deadline:
                    raise QmpUnavailable(
                        f"QMP socket {self.socket} unreachable: {exc}", vm=self.vm
                    ) from exc
                await asyncio.sleep(0.05)

    @property
    def connected(self) -> bool:
        return self._qmp.runstate.name == "RUNNING"

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, oob: bool = False
    ) -> Any:
        """``oob``: out of band, for the few commands QEMU allows so (its monitor thread runs
        them while the main loop is blocked, e.g. on a postcopy page fault)."""
        try:
            return await self._qmp.execute(command, arguments, oob=oob)
        except ExecuteError as exc:
            raise QmpError(command, exc.error_class, str(exc), vm=self.vm) from exc
        except (StateError, ConnectError, EOFError, ConnectionError) as exc:
            raise QmpUnavailable(f"QMP {command}: monitor gone: {exc}", vm=self.vm) from exc
        except QMPError as exc:
            raise QmpUnavailable(f"QMP {command}: {exc}", vm=self.vm) from exc

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Subscribe before issuing the command whose events you wait for: none can be missed."""
        listener = EventListener(list(names) if names else None)
        with self._qmp.listen(listener):
            yield listener

    async def status(self) -> str:
        result = await self.execute("query-status")
        return str(result["status"])

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._qmp.disconnect()
