"""Process lists and usage on the vserver page (panel/guests/processes.py): the panel's side.

What crosses to the agent (one stream however many pages watch, the guest's
own rows and usage, the stream coming back after an agent restart) is tested
against a real agent in test_live_e2e_agent.py. Here, what needs no agent:
which lists a page is given, the dashboard refusing to watch, and how the
usage figures are made from the agent's answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from panel.guests import consumers, processes
from panel.guests.models import VServer
from panel.hosting.models import Host, Membership
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


@pytest.fixture
def world(channel_layer: str, watcher: Any, monkeypatch: pytest.MonkeyPatch) -> World:
    # No agent at the host's socket: the watcher's own messages are its errors, again
    # and again as it retries (soon, here).
    monkeypatch.setattr(processes, "BACKOFF_MIN", 0.1)
    monkeypatch.setattr(processes, "BACKOFF_MAX", 0.2)
    w = make_world()
    VServer.objects.filter(pk__in=[w.vs.pk, w.theirs.pk]).update(status="running")
    return w


def is_own(m: dict[str, Any]) -> bool:
    return m["type"] == "processes" and m["error"] is not None


def test_only_this_processs_lists_are_forwarded_and_only_while_allowed(
        world: World, watcher: Any) -> None:
    cookie = session_cookie(world.users["alice"])

    def foreign_rows() -> None:
        # Another panel process's stream of the same vserver (the group spans processes).
        async_to_sync(get_channel_layer().group_send)(processes.group(world.vs.pk), {
            "type": "processes.rows", "vserver": world.vs.pk, "source": "elsewhere",
            "running": True, "rows": [], "total": 7, "usage": None, "error": None, "ts": 0})

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await page.send_json_to({"type": "watch-processes"})
        got = await messages_until(page, is_own)
        assert "agent" in got[-1]["error"] and got[-1]["running"] is None
        await sync(foreign_rows)()
        for _ in range(3):  # its own lists go on; the foreign one never comes
            msg = await page.receive_json_from()
            assert is_own(msg) and msg["total"] == 0, msg
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
        # Its leaving ended the stream: nobody else watched.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while watcher.tasks():
            assert loop.time() < deadline, "the stream outlived its last page"
            await asyncio.sleep(0.02)
        assert watcher.watchers(world.vs.pk) == 0

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


# --- usage from the agent's answers ------------------------------------------------------

def usage_reply(cpu_seconds: float | None, uptime: float, memory: int | None = 50 << 20,
                procs: int = 3, disk: int | None = None) -> dict[str, Any]:
    return {"name": "shop", "context": 49152, "cgroup": "vpanel/shop", "processes": procs,
            "cpu_seconds": cpu_seconds, "cpu_user_seconds": None, "cpu_system_seconds": None,
            "memory_current": memory, "memory_peak": None, "net_rx_bytes": None,
            "net_tx_bytes": None, "disk_used": disk, "uptime": uptime}


def sums() -> dict[str, Any]:
    """A list's sums, as processes._rows makes them: 2 processes, 12.5 % of a CPU."""
    return {"processes": 2, "cpu": 12.5, "mem": 2.1, "rss": 22020096, "memory": None,
            "disk": None}


def test_usage_takes_the_cgroups_figures_and_cpu_from_its_time_between_two_looks() -> None:
    replies = iter([usage_reply(10.0, 100.0), usage_reply(11.5, 102.0),
                    usage_reply(11.5, 1.0)])  # the last: restarted meanwhile
    asked: list[str] = []

    def agent(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("/quota"):
            return httpx.Response(200, json={"name": "shop", "mode": "btrfs-qgroup",
                                             "used": 300 << 20, "limit": 1 << 30})
        return httpx.Response(200, json=next(replies))

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(agent),
                                     base_url="http://agent") as http:
            u = processes._Usage(http, "shop")
            out = []
            for _ in range(3):
                figures = sums()
                await u.fill(figures)
                out.append(figures)
            return out

    first, second, third = asyncio.run(go())
    # The first look: the cgroup's memory and count, the rows' CPU (no earlier look).
    assert first == {**sums(), "processes": 3, "memory": 50 << 20, "disk": 300 << 20}
    # Then 1.5 CPU seconds in 2 seconds: 75 % of one CPU, whatever the rows summed.
    assert second["cpu"] == 75.0
    # A guest that restarted has no earlier look to compare with.
    assert third["cpu"] == 12.5
    # The disk, a qgroup query, once; the usage at each list.
    assert asked.count("/1.0/guests/shop/quota") == 1
    assert asked.count("/1.0/guests/shop/usage") == 3


def test_an_agent_that_counts_the_disk_with_the_usage_is_not_asked_for_the_quota() -> None:
    asked: list[str] = []

    def agent(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json=usage_reply(1.0, 10.0, disk=7 << 20))

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(agent),
                                     base_url="http://agent") as http:
            figures = sums()
            await processes._Usage(http, "shop").fill(figures)
            return figures

    assert asyncio.run(go())["disk"] == 7 << 20
    assert asked == ["/1.0/guests/shop/usage"]


def test_an_agent_that_cannot_say_the_usage_leaves_the_rows_sums_and_is_asked_later() -> None:
    asked: list[str] = []

    def agent(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(409, text=json.dumps({"error": "shop is not running"}))

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(agent),
                                     base_url="http://agent") as http:
            u = processes._Usage(http, "shop")
            out = []
            for _ in range(2):
                figures = sums()
                await u.fill(figures)
                out.append(figures)
            return out

    assert asyncio.run(go()) == [sums(), sums()]
    assert asked == ["/1.0/guests/shop/usage"]  # not again before USAGE_RETRY
