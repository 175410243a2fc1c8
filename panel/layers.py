"""The Redis channel layer, with a receive that a cancel always ends.

Channels ends a consumer by cancelling its pending `receive()` on the layer
and waiting for it (channels.utils.await_many_dispatch). channels_redis's
RedisChannelLayer receives with BZPOPMIN through redis-py, and redis-py can
swallow a cancel that arrives just as BZPOPMIN's answer does (redis-py issue
#2028): the receive then goes on waiting for a message on a channel nobody
sends to any more, and the consumer, with the page's websocket, never ends.
Seen here about once in twenty closes of the teacher's grid, whose samples
arrive on every socket every interval.

So the layer's own receive runs in a task of its own, and this one only
waits for it: a cancel ends this wait at once, and the inner task is
cancelled again every RECANCEL seconds until it has ended (the next cancel
finds it waiting on the socket, where nothing swallows it). A message the
inner task still takes meanwhile is for the consumer that is leaving, as
channels_redis itself assumes of a cancelled receive; one it reads for
another channel is kept in that channel's buffer as always.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels_redis import core

__all__ = ["RECANCEL", "RedisChannelLayer"]

RECANCEL = 0.5  # seconds between two cancels of a receive that has not ended


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the ended task's outcome as seen (no 'exception never retrieved')."""
    if not task.cancelled():
        task.exception()


def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    loop = task.get_loop()

    def again() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(RECANCEL, again)

    task.add_done_callback(_retrieve)
    again()


class RedisChannelLayer(core.RedisChannelLayer):  # type: ignore[misc]
    """channels_redis.core.RedisChannelLayer whose receive() ends when cancelled."""

    async def receive(self, channel: str) -> dict[str, Any]:
        inner = asyncio.ensure_future(super().receive(channel))
        try:
            return await asyncio.shield(inner)  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            _cancel_until_done(inner)
            raise
