"""Process lists on the vserver page (panel/guests/processes.py), on both channel layers.

However many pages watch one vserver, the panel keeps ONE stream open to its
agent, and none once they have all left. The agent here is the agent's own
API and event bus on a Unix socket, with pretend guests (agentfake.py), so
its listener and sampler counts are the agent's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from hostagent import wire
from hostagent.events import EventBus
from panel.guests import consumers, processes
from panel.guests.models import VServer
from panel.hosting.models import Host, Membership
from tests.panel.live import agentfake
from tests.panel.live.helpers import (
    World,
    closed_with,
    connect,
    make_world,
    messages_until,
    no_message,
    run,
    session_cookie,
    sync,
)

pytestmark = [pytest.mark.django_db(transaction=True)]

N = 5  # pages watching one vserver


@pytest.fixture
def world(channel_layer: str, short_socket_dir: Path, watcher: Any) -> World:
    watcher.interval = 0.5  # the agent's shortest: the tests need not wait 2 s a list
    w = make_world(str(short_socket_dir / "agent.sock"))
    VServer.objects.filter(pk__in=[w.vs.pk, w.theirs.pk]).update(status="running")
    return w


def is_rows(m: dict[str, Any]) -> bool:
    return m["type"] == "processes" and m["running"] is True


async def settle(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


def test_n_pages_cost_one_agent_stream_and_none_once_they_leave(
        world: World, watcher: Any) -> None:
    socket = Path(world.host.agent_socket)
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        async with agentfake.serve(socket) as agent:
            agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
            pages = [(await connect(f"/ws/vservers/{world.vs.pk}/", cookie))[0]
                     for _ in range(N)]
            # Connected, not watching: nothing is asked of the agent.
            assert agent.bus.listeners() == 0 and agent.samples == 0
            for page in pages:
                await page.send_json_to({"type": "watch-processes"})
            for page in pages:
                msg = (await messages_until(page, is_rows))[-1]
                assert [r["pid"] for r in msg["rows"]] == [7, 1]  # the busiest first
                assert msg["rows"][0] == {
                    "pid": 7, "user": "www-data", "cpu": 12.5, "mem": 2.0, "rss": 20971520,
                    # The guest's own text, as is: the page escapes it (static/js/live.js).
                    "command": "httpd -f shop \x1b[31m\u202e"}
                assert msg["total"] == 2 and msg["error"] is None
                assert msg["usage"] == {"processes": 2, "cpu": 12.5, "mem": 2.1,
                                        "rss": 22020096}
            # One stream, one sampler, however many pages.
            assert agent.bus.listeners() == 1 and agent.bus.samplers() == {"shop"}
            assert (watcher.streams(), watcher.opened, watcher.watchers(world.vs.pk)) == (
                1, 1, N)
            # A page that stops watching stops getting lists; the others go on.
            await pages[0].send_json_to({"type": "unwatch-processes"})
            await settle(lambda: watcher.watchers(world.vs.pk) == N - 1)
            await messages_until(pages[1], is_rows)
            while not await pages[0].receive_nothing(timeout=0.8):
                assert (await pages[0].receive_json_from())["type"] == "processes"  # in flight
            assert agent.bus.listeners() == 1
            # The last to leave closes the stream; the agent stops sampling.
            for page in pages:
                await page.disconnect()
            await settle(lambda: agent.bus.listeners() == 0)
            assert agent.bus.samplers() == set() and watcher.streams() == 0
            assert watcher.tasks() == 0
            samples = agent.samples
            await asyncio.sleep(1.2)
            assert agent.samples == samples  # nobody watches: nothing is polled

    run(go)


def test_a_late_page_gets_the_last_list_at_once_and_a_stopped_guest_says_so(
        world: World, watcher: Any) -> None:
    socket = Path(world.host.agent_socket)
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        async with agentfake.serve(socket) as agent:
            agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
            first, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
            await first.send_json_to({"type": "watch-processes"})
            await messages_until(first, is_rows)
            late, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
            await late.send_json_to({"type": "watch-processes"})
            msg = await late.receive_json_from(timeout=0.3)  # before the next sample
            assert is_rows(msg)
            agent.set("shop", wire.STATE_STOPPED)
            got = await messages_until(late, lambda m: m["type"] == "processes"
                                       and m["running"] is False)
            assert got[-1]["rows"] == [] and got[-1]["total"] == 0
            assert watcher.opened == 1
            await first.disconnect()
            await late.disconnect()

    run(go)


def test_the_stream_comes_back_after_the_agent_restarts(world: World, watcher: Any) -> None:
    socket = Path(world.host.agent_socket)
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        agent = agentfake.FakeAgent(asyncio.get_running_loop())
        agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
        async with agentfake.serve(socket, agent):
            await page.send_json_to({"type": "watch-processes"})
            await messages_until(page, is_rows)
        # The agent went away: the page is told, and the watcher tries again.
        got = await messages_until(page, lambda m: m["type"] == "processes"
                                   and m["error"] is not None)
        assert got[-1]["running"] is None and "agent" in got[-1]["error"]
        agent.bus = EventBus(asyncio.get_running_loop(), agent._sample)
        async with agentfake.serve(socket, agent):
            await messages_until(page, is_rows, timeout=10)
            assert watcher.opened == 2 and agent.bus.listeners() == 1
            await page.disconnect()
            await settle(lambda: agent.bus.listeners() == 0)

    run(go)


def test_only_this_processs_rows_are_forwarded_and_only_while_allowed(
        world: World, watcher: Any) -> None:
    socket = Path(world.host.agent_socket)
    cookie = session_cookie(world.users["alice"])

    def foreign_rows() -> None:
        # Another panel process's stream of the same vserver (the group spans processes).
        async_to_sync(get_channel_layer().group_send)(processes.group(world.vs.pk), {
            "type": "processes.rows", "vserver": world.vs.pk, "source": "elsewhere",
            "running": True, "rows": [], "total": 0, "usage": None, "error": None, "ts": 0})

    async def go() -> None:
        async with agentfake.serve(socket) as agent:
            agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
            page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
            await page.send_json_to({"type": "watch-processes"})
            await messages_until(page, is_rows)
            await sync(foreign_rows)()
            msg = await page.receive_json_from(timeout=3)
            assert msg["total"] == 2  # the next list of its own, not the foreign one
            # Membership gone, behind the signals' back: the next list finds out.
            from panel.guests import signals

            real, signals._tell = signals._tell, lambda *a: None
            try:
                await sync(lambda: Membership.objects.filter(
                    user=world.users["alice"]).delete())()
                assert await closed_with(page, connect=False) == (consumers.CLOSE_MISSING,
                                                                  "no such vserver")
            finally:
                signals._tell = real
            await settle(lambda: agent.bus.listeners() == 0)

    run(go)


def test_the_dashboard_does_not_do_processes(world: World) -> None:
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        dash, _ = await connect("/ws/vservers/", cookie)
        await dash.send_json_to({"type": "watch-processes"})
        assert (await dash.receive_json_from())["type"] == "error"
        await no_message(dash)
        await dash.disconnect()

    run(go)
    assert Host.objects.count() == 1
