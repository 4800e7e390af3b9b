"""The two ends of one live migration: its hosts, and every call to their agents.

All of a migration's agent I/O goes through ``Ends`` (one seam, as httpx's transport): the
port, its disk mirror and its undo steps call the source and the destination by side, and a
client error becomes a ``StepError`` naming the step and the host in one place. ``migration``
is the migration's id: the callers pass it on every call of the contract that takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from qmotion.api.errors import AgentErrorCode
from qmotion.api.vm import VmInfo
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ClientError, NotFound
from qmotion.migration.errors import StepError
from qmotion.server.db import Host
from qmotion.server.inventory import Inventory

T = TypeVar("T")
CALL_TIMEOUT_S = 120.0


def host_copy(h: Host) -> Host:
    """What a task needs of a host, detached from the database session."""
    return Host(name=h.name, agent_url=h.agent_url, token=h.token, facts=h.facts)


class Ends:
    """The source and destination agents of the migration ``migration`` of ``vm``."""

    def __init__(
        self, inventory: Inventory, vm: str, src: Host, dst: Host, migration: str | None = None
    ) -> None:
        self.inventory, self.vm, self.migration = inventory, vm, migration
        self.src, self.dst = src, dst

    async def source(
        self, step: str, fn: Callable[[AgentClient], T], timeout_s: float = CALL_TIMEOUT_S
    ) -> T:
        """One call to the source's agent; its failure is the step's."""
        return await self._call(self.src, step, fn, timeout_s)

    async def destination(
        self, step: str, fn: Callable[[AgentClient], T], timeout_s: float = CALL_TIMEOUT_S
    ) -> T:
        """One call to the destination's agent; its failure is the step's."""
        return await self._call(self.dst, step, fn, timeout_s)

    async def source_raw(
        self, fn: Callable[[AgentClient], T], timeout_s: float = CALL_TIMEOUT_S
    ) -> T:
        """One call to the source's agent; the client's own errors pass through (the caller
        reads the agent's error code)."""
        return await self._raw(self.src, fn, timeout_s)

    async def destination_raw(
        self, fn: Callable[[AgentClient], T], timeout_s: float = CALL_TIMEOUT_S
    ) -> T:
        """One call to the destination's agent; the client's own errors pass through."""
        return await self._raw(self.dst, fn, timeout_s)

    async def destination_vm(self, step: str) -> VmInfo | None:
        """The VM as the destination's agent reports it; None when the agent itself says it
        has no such VM; a ``StepError`` of ``step`` when it cannot be asked."""
        try:
            return await self._raw(self.dst, lambda c: c.vm(self.vm), CALL_TIMEOUT_S)
        except NotFound as exc:
            if exc.detail.code == AgentErrorCode.VM_NOT_FOUND:
                return None
            raise self._error(self.dst, step, exc) from exc
        except ClientError as exc:
            raise self._error(self.dst, step, exc) from exc

    def _error(self, host: Host, step: str, exc: ClientError) -> StepError:
        return StepError(step, f"host {host.name}: {exc}", vm=self.vm, host=host.name)

    async def _call(
        self, host: Host, step: str, fn: Callable[[AgentClient], T], timeout_s: float
    ) -> T:
        try:
            return await self._raw(host, fn, timeout_s)
        except ClientError as exc:
            raise self._error(host, step, exc) from exc

    async def _raw(self, host: Host, fn: Callable[[AgentClient], T], timeout_s: float) -> T:
        """One agent call in a worker thread; the client's own errors pass through."""

        def work() -> T:
            with self.inventory.agents.client(host.agent_url, host.token, timeout_s) as client:
                return fn(client)

        return await asyncio.to_thread(work)


def delete_vm(client: AgentClient, vm: str, migration: str | None) -> None:
    """Remove the destination of ``migration`` (``vm``) from an agent; one already gone is
    removed. With the id the agent refuses (409) a VM that runs or did not arrive by it."""
    with contextlib.suppress(NotFound):
        client.delete(vm, force=True, migration=migration)
