"""What the live pages' tests need of an agent that a real one cannot give on demand.

Whatever crosses the panel<->agent boundary as a real guest makes it is tested
against a real `hostagent serve` (test_live_e2e_agent.py, test_console_consumer.py).
What stays here:

- agent-shaped events (`lifecycle_event`, `operation_event`, `agent_operation`)
  and a StubClient answering what the bridge asks, for the tests that feed
  the bridge's handler directly: each kind of event on its own
  (test_bridge.py) and random interleavings of them, progress at any point
  and failures included (test_live_property.py);
- a FakeAgent: the agent's own aiohttp application (hostagent.api.make_app)
  and event bus (hostagent.events.EventBus) on a Unix socket with pretend
  guests (a dict of name -> (state, context, init pid)), run in a thread of
  its own by ThreadedAgent, so that a test can make the bus drop a listener
  that fell behind (test_bridge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from hostagent import api, wire
from hostagent.events import EventBus

__all__ = ["FakeAgent", "StubClient", "ThreadedAgent", "agent_operation", "lifecycle_event",
           "operation_event", "serve"]


class FakeAgent:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.guests_: dict[str, tuple[str, int | None, int | None]] = {}
        self.bus = EventBus(loop, self._sample)
        self.group_id: int | None = os.getgid()  # not root: our own group may call
        self.loop = loop

    def _sample(self, name: str) -> list[dict[str, Any]] | None:
        return None  # no process lists: the real agent's are tested with real guests

    # --- what hostagent.api's handlers call ---

    def _info(self, name: str) -> wire.GuestInfo:
        state, ctx, pid = self.guests_[name]
        return wire.GuestInfo.from_json({
            "name": name, "state": state, "context": ctx, "init_pid": pid, "processes": 0,
            "uptime": 0.0, "addresses": [], "description": None, "onboot": False,
            "priority": 100, "template": None, "unrestricted_network": False, "disk": None,
            "limits": []})

    async def guests(self) -> list[wire.GuestInfo]:
        return [self._info(n) for n in sorted(self.guests_)]

    async def guest(self, name: str) -> wire.GuestInfo:
        if name not in self.guests_:
            raise api.ApiError(404, f"no vserver {name}", "name")
        return self._info(name)

    # --- the pretend host (event loop thread) ---

    def set(self, name: str, state: str, ctx: int | None = None,
            pid: int | None = None) -> None:
        self.guests_[name] = (state, ctx, pid)


def agent_operation(kind: str, guest: str, state: str, progress: int = 0,
                    message: str = "", result: dict[str, Any] | None = None,
                    error: str | None = None, op_id: str | None = None) -> dict[str, Any]:
    """An Operation's to_json() as the agent's bus carries it."""
    now = time.time()
    return wire.Operation(id=op_id or uuid.uuid4().hex, kind=kind, guest=guest, state=state,
                          progress=progress, message=message, result=result, error=error,
                          created=now, updated=now, may_cancel=False).to_json()


@contextlib.asynccontextmanager
async def serve(socket: Path, agent: FakeAgent | None = None) -> AsyncIterator[FakeAgent]:
    """The fake agent on SOCKET in the running loop, until the block ends."""
    agent = agent or FakeAgent(asyncio.get_running_loop())
    runner = web.AppRunner(api.make_app(agent))  # type: ignore[arg-type]
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()
    try:
        yield agent
    finally:
        await agent.bus.close()
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


class ThreadedAgent:
    """The fake agent in a thread of its own; stop() and start() again as an agent restarts."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.agent = self.call(lambda: FakeAgent(self.loop))
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run FN in the agent's loop and return what it returns."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def start(self) -> ThreadedAgent:
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            self.agent.bus = EventBus(self.loop, self.agent._sample)
            async with serve(self.socket, self.agent):
                ready.set()
                await self._stop.wait()

        self._done = asyncio.run_coroutine_threadsafe(main(), self.loop)  # type: ignore[assignment]
        assert ready.wait(10), "the fake agent did not start"
        return self

    def stop(self) -> None:
        if self._stop is not None and self._done is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._done.result(10)  # type: ignore[attr-defined]
            self._stop = self._done = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def listeners(self) -> int:
        return int(self.call(self.agent.bus.listeners))


class StubClient:
    """What the bridge and reconcile.refresh_host ask of an AgentClient, from a dict:
    for the tests that call the bridge's handler directly with agent-shaped events."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, int | None, int | None]] = {}
        self.asked = 0

    def set(self, name: str, state: str, ctx: int | None = None, pid: int | None = None) -> None:
        self.state[name] = (state, ctx, pid)

    def _info(self, name: str) -> wire.GuestInfo:
        state, ctx, pid = self.state[name]
        return wire.GuestInfo.from_json({
            "name": name, "state": state, "context": ctx, "init_pid": pid, "processes": 0,
            "uptime": 0.0, "addresses": [], "description": None, "onboot": False,
            "priority": 100, "template": None, "unrestricted_network": False, "disk": None,
            "limits": []})

    def guest(self, name: str) -> wire.GuestInfo:
        from hostagent.client import AgentError

        self.asked += 1
        if name not in self.state:
            raise AgentError(404, f"no vserver {name}", "name")
        return self._info(name)

    def guests(self) -> list[wire.GuestInfo]:
        self.asked += 1
        return [self._info(n) for n in sorted(self.state)]

    def close(self) -> None:
        pass


def lifecycle_event(name: str, action: str, state: str, **meta: Any) -> wire.Event:
    """A lifecycle event as it comes off the agent's stream."""
    return wire.Event.from_json({"type": wire.TYPE_LIFECYCLE, "timestamp": time.time(),
                                 "guest": name, "action": action,
                                 "metadata": {"state": state, **meta}})


def operation_event(op: dict[str, Any]) -> wire.Event:
    return wire.Event.from_json({"type": wire.TYPE_OPERATION, "timestamp": time.time(),
                                 "guest": op["guest"], "action": "operation", "metadata": op})
