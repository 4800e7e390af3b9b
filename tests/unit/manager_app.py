"""The real manager's app over the scripted agents, served in-process to a test's HTTP client
(shared by the manager-level unit tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import httpx

from qmotion.api.server import TaskOut
from qmotion.server.http.app import create_app
from tests.unit.agent_world import World

TOKEN = "manager-token-0123456789"
Client = httpx.AsyncClient


def run_manager(
    world: World, url: str, test: Callable[[Client], Awaitable[None]], lifespan: bool = False
) -> None:
    """Run ``test`` against the manager on database ``url``; ``lifespan``: as a started
    manager (recovery, its loops), not only its routes."""
    app = create_app(url, TOKEN, agents=world.connector())

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if lifespan:
                await stack.enter_async_context(app.router.lifespan_context(app))
            c = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://manager",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            )
            await test(c)

    asyncio.run(main())


async def wait_task(c: Client, task_id: int) -> TaskOut:
    """The task once it is no longer active (30 s at most)."""
    for _ in range(600):
        t = TaskOut.model_validate((await c.get(f"/v1/tasks/{task_id}")).json())
        if not t.state.active:
            return t
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never ended")
