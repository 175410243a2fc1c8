"""The agent's one event stream: lifecycle, operation progress, process lists.

Every listener has a bounded queue. Publishing never waits for a listener: one
whose queue is full has fallen behind, and is dropped with a last event that
says so (as Incus does), rather than slowing the agent or growing its memory.
A dropped listener re-fetches the state it needs and subscribes again.

Process lists are sampled only while someone asks for them: one sampler per
guest, however many listeners watch it, stopped when the last one leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hostagent import wire

__all__ = ["EventBus", "Listener"]

_LOG = logging.getLogger(__name__)

QUEUE_EVENTS = 1024  # per listener; more than this unread and it is dropped
MIN_INTERVAL = 0.5  # seconds between two process samples of one guest


@dataclass(eq=False)
class Listener:
    types: frozenset[str]
    guests: frozenset[str] | None  # None: every guest
    processes: frozenset[str]  # guests whose process lists it wants
    interval: float
    queue: asyncio.Queue[wire.Event | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_EVENTS))
    dropped: str | None = None

    def wants(self, event: wire.Event) -> bool:
        if event.type == wire.TYPE_PROCESSES:
            return event.guest in self.processes
        if event.type not in self.types:
            return False
        return self.guests is None or event.guest is None or event.guest in self.guests

    async def next(self) -> wire.Event | None:
        """The next event; None once the listener has been dropped or closed."""
        return await self.queue.get()


Sample = Callable[[str], list[dict[str, Any]] | None]


class EventBus:
    """Fan-out of events to listeners; lives in the agent's event loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sample: Sample) -> None:
        self._loop = loop
        self._listeners: set[Listener] = set()
        self._sample = sample  # guest -> its process rows, or None if it is not running
        self._samplers: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, set[Listener]] = {}

    # --- publishing ---

    def publish(self, type_: str, action: str, guest: str | None = None, /,
                **metadata: Any) -> None:
        """Send an event to every listener that wants it (event loop thread only)."""
        ev = wire.Event(type=type_, timestamp=time.time(), guest=guest, action=action,
                        metadata=metadata)
        for lst in list(self._listeners):
            if lst.wants(ev):
                self._offer(lst, ev)

    def publish_threadsafe(self, type_: str, action: str, guest: str | None = None, /,
                           **metadata: Any) -> None:
        self._loop.call_soon_threadsafe(
            lambda: self.publish(type_, action, guest, **metadata))

    def _offer(self, lst: Listener, ev: wire.Event) -> None:
        try:
            lst.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.drop(lst, f"fell behind: {lst.queue.qsize()} events unread")

    def drop(self, lst: Listener, reason: str) -> None:
        """Stop sending to LST; its reader gets a 'dropped' event, then None."""
        if lst.dropped is not None:
            return
        lst.dropped = reason
        self._remove(lst)
        # Make room for the two last items: the reason, then the end.
        while lst.queue.qsize() > QUEUE_EVENTS - 2:
            lst.queue.get_nowait()
        lst.queue.put_nowait(wire.Event(type=wire.TYPE_DROPPED, timestamp=time.time(),
                                        guest=None, action="listener-dropped",
                                        metadata={"reason": reason}))
        lst.queue.put_nowait(None)
        _LOG.warning("event listener dropped: %s", reason)

    # --- listeners ---

    def subscribe(self, types: Iterable[str], guests: Iterable[str] | None = None,
                  processes: Iterable[str] = (), interval: float = 2.0) -> Listener:
        lst = Listener(frozenset(types), None if guests is None else frozenset(guests),
                       frozenset(processes), max(MIN_INTERVAL, interval))
        self._listeners.add(lst)
        for name in lst.processes:
            self._watchers.setdefault(name, set()).add(lst)
            if name not in self._samplers:
                self._samplers[name] = self._loop.create_task(self._sampler(name))
        return lst

    def unsubscribe(self, lst: Listener) -> None:
        self._remove(lst)

    def _remove(self, lst: Listener) -> None:
        self._listeners.discard(lst)
        for name in lst.processes:
            watchers = self._watchers.get(name)
            if watchers is None:
                continue
            watchers.discard(lst)
            if not watchers:
                del self._watchers[name]
                task = self._samplers.pop(name, None)
                if task is not None:
                    task.cancel()

    def listeners(self) -> int:
        return len(self._listeners)

    def samplers(self) -> set[str]:
        """Guests whose process lists are being sampled now."""
        return set(self._samplers)

    async def _sampler(self, name: str) -> None:
        """Sample NAME's processes for as long as someone watches it."""
        while True:
            watchers = self._watchers.get(name)
            if not watchers:
                return
            try:
                rows = await self._loop.run_in_executor(None, self._sample, name)
            except Exception:
                _LOG.exception("sampling the processes of %s", name)
                rows = None
            self.publish(wire.TYPE_PROCESSES, "processes", name, running=rows is not None,
                         processes=rows or [])
            await asyncio.sleep(min(w.interval for w in watchers) if watchers else 1.0)

    async def close(self) -> None:
        for lst in list(self._listeners):
            self._remove(lst)
            with contextlib.suppress(asyncio.QueueFull):
                lst.queue.put_nowait(None)
        for task in self._samplers.values():
            task.cancel()
        self._samplers.clear()
