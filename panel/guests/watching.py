"""One background task per watched thing, shared by every page that watches it.

The live pages' feeds (panel/guests/processes.py: a vserver's process list;
panel/classroom/sampler.py: a class's usage grid) each run one task per
key while at least one page watches that key, and none when nobody does:
`_watch` counts a page in and starts the task if it is not running (or ran
in another event loop: tests), `unwatch` counts one out and cancels the task
with the last. The task keeps `_last[key]`, what a page that starts
watching is shown at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["SharedTasks"]


class SharedTasks:
    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._last: dict[int, dict[str, Any]] = {}

    async def _watch(self, key: int, run: Callable[[], Coroutine[Any, Any, None]],
                     name: str) -> dict[str, Any] | None:
        """One more page watches KEY; RUN() makes its task if none runs. The last
        message of KEY (None before the first)."""
        self._counts[key] = self._counts.get(key, 0) + 1
        task = self._tasks.get(key)
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._tasks[key] = loop.create_task(run(), name=name)
        return self._last.get(key)

    async def unwatch(self, key: int) -> None:
        """One page fewer; the last one's leaving ends the task."""
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
            return
        self._counts.pop(key, None)
        self._last.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def watched(self, key: int) -> bool:
        """Does some page still watch KEY (the task's loop condition)?"""
        return bool(self._counts.get(key))

    def watchers(self, key: int) -> int:
        return self._counts.get(key, 0)

    def tasks(self) -> int:
        """Keys with a task running now."""
        return sum(1 for t in self._tasks.values() if not t.done())

    def reset(self) -> None:
        """Forget everything (tests: each runs its own event loop)."""
        for task in self._tasks.values():
            if not task.done():
                task.get_loop().call_soon_threadsafe(task.cancel)
        self._counts.clear()
        self._tasks.clear()
        self._last.clear()
