"""The event bus: a slow listener is dropped, process lists cost nothing unwatched."""

from __future__ import annotations

import asyncio
from typing import Any

from hostagent import wire
from hostagent.events import QUEUE_EVENTS, EventBus


def test_a_listener_that_falls_behind_is_dropped_with_a_reason() -> None:
    async def scenario() -> None:
        bus = EventBus(asyncio.get_running_loop(), lambda _n: None)
        slow = bus.subscribe([wire.TYPE_LIFECYCLE])
        fast = bus.subscribe([wire.TYPE_LIFECYCLE])
        got = 0
        for i in range(QUEUE_EVENTS + 500):
            bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_UPDATED, "g", n=i)
            while not fast.queue.empty():  # the fast one keeps up
                await fast.next()
                got += 1
        assert got == QUEUE_EVENTS + 500 and fast.dropped is None
        assert slow.dropped is not None and "fell behind" in slow.dropped
        assert bus.listeners() == 1
        events = []
        while (ev := await slow.next()) is not None:
            events.append(ev)
        assert events[-1].type == wire.TYPE_DROPPED
        assert events[-1].metadata["reason"] == slow.dropped
        assert len(events) <= QUEUE_EVENTS
        # In order, up to where it fell behind.
        ns = [e.metadata["n"] for e in events[:-1]]
        assert ns == sorted(ns)
    asyncio.run(scenario())


def test_listeners_get_only_what_they_asked_for() -> None:
    async def scenario() -> None:
        bus = EventBus(asyncio.get_running_loop(), lambda _n: None)
        only_a = bus.subscribe([wire.TYPE_LIFECYCLE], guests=["a"])
        ops = bus.subscribe([wire.TYPE_OPERATION])
        bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_STARTED, "a")
        bus.publish(wire.TYPE_LIFECYCLE, wire.EVENT_GUEST_STARTED, "b")
        bus.publish(wire.TYPE_OPERATION, "operation", "b", id="x")
        assert [e.guest for e in _drain(only_a)] == ["a"]
        assert [e.metadata["id"] for e in _drain(ops)] == ["x"]
    asyncio.run(scenario())


def _drain(lst: Any) -> list[wire.Event]:
    out = []
    while not lst.queue.empty():
        out.append(lst.queue.get_nowait())
    return out


def test_process_lists_are_sampled_once_per_guest_and_only_while_watched() -> None:
    calls: list[str] = []

    def sample(name: str) -> list[dict[str, Any]] | None:
        calls.append(name)
        return [{"pid": 1}]

    async def scenario() -> None:
        bus = EventBus(asyncio.get_running_loop(), sample)
        assert bus.samplers() == set()
        await asyncio.sleep(0.2)
        assert calls == []  # nobody watches: nothing is read
        one = bus.subscribe([], processes=["web"], interval=0.5)
        two = bus.subscribe([], processes=["web"], interval=0.5)
        assert bus.samplers() == {"web"}
        await asyncio.sleep(1.2)
        n = len(calls)
        assert 2 <= n <= 4, calls  # one sampler for both listeners
        for lst in (one, two):
            evs = _drain(lst)
            assert evs and all(e.type == wire.TYPE_PROCESSES for e in evs)
            assert evs[0].metadata["processes"] == [{"pid": 1}]
        bus.unsubscribe(one)
        assert bus.samplers() == {"web"}
        bus.unsubscribe(two)
        assert bus.samplers() == set()
        await asyncio.sleep(0.8)
        assert len(calls) <= n + 1  # and it stopped
    asyncio.run(scenario())
