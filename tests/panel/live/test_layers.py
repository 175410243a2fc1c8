"""panel/layers.py: the Redis channel layer's receive always ends when cancelled.

Channels ends a consumer by cancelling its receive. With channels_redis's own
layer a cancel that meets BZPOPMIN's answer (a message for another consumer of
the process) is swallowed about one time in four here, and that receive then
waits forever. These tests make that moment a hundred times, on the private
redis of `make test`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from panel import layers

ROUNDS = 100


def _layer(redis_url: str) -> layers.RedisChannelLayer:
    return layers.RedisChannelLayer(hosts=[{"address": redis_url}],
                                    prefix=f"vpt-{uuid.uuid4().hex[:12]}")


Receive = asyncio.Future[dict[str, Any]]


async def _leave_as_a_message_comes(layer: layers.RedisChannelLayer, staying: str,
                                    i: int) -> tuple[Receive, Receive]:
    """Round I: a consumer that leaves (a channel of its own, as each consumer has), whose
    receive reads for the process (BZPOPMIN) when the message for STAYING's receive comes,
    and its cancel with it (or a step or two of the loop later: where the answer then is
    varies). (the leaving receive, just cancelled; the staying one)."""
    leaving = await layer.new_channel()
    gone = asyncio.ensure_future(layer.receive(leaving))
    await asyncio.sleep(0.002)
    kept = asyncio.ensure_future(layer.receive(staying))
    await asyncio.sleep(0.001)
    await layer.send(staying, {"type": "tick", "i": i})
    for _ in range(i % 3):
        await asyncio.sleep(0)
    gone.cancel()
    return gone, kept


def test_a_cancelled_receive_ends_even_as_another_consumers_message_arrives(
        redis_url: str) -> None:
    async def go() -> None:
        layer = _layer(redis_url)
        staying = await layer.new_channel()
        try:
            for i in range(ROUNDS):
                gone, kept = await _leave_as_a_message_comes(layer, staying, i)
                done, _ = await asyncio.wait([gone], timeout=2)
                assert done == {gone} and gone.cancelled(), f"round {i}: the receive went on"
                # Nothing lost for the consumer that stays.
                assert (await asyncio.wait_for(kept, 5))["i"] == i
        finally:
            await layer.flush()

    asyncio.run(go())


def test_the_library_receive_behind_a_cancelled_one_ends_too(redis_url: str) -> None:
    """The inner receive, cancelled again until it ends, leaves no task behind."""
    async def go() -> None:
        layer = _layer(redis_url)
        staying = await layer.new_channel()
        try:
            for i in range(ROUNDS // 4):
                _, kept = await _leave_as_a_message_comes(layer, staying, i)
                await asyncio.wait_for(kept, 5)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20 * layers.RECANCEL + 5
            me = asyncio.current_task()
            while [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
                assert loop.time() < deadline, [t for t in asyncio.all_tasks() if t is not me]
                await asyncio.sleep(0.05)
            assert layer.receive_count == 0
        finally:
            await layer.flush()

    asyncio.run(go())


def test_a_receive_not_cancelled_gets_its_message(redis_url: str) -> None:
    async def go() -> None:
        layer = _layer(redis_url)
        channel = await layer.new_channel()
        try:
            waiting = asyncio.ensure_future(layer.receive(channel))
            await asyncio.sleep(0.01)
            await layer.send(channel, {"type": "hello"})
            assert await asyncio.wait_for(waiting, 5) == {"type": "hello"}
        finally:
            await layer.flush()

    asyncio.run(go())
