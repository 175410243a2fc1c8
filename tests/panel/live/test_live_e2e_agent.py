"""The live pages against a real agent: the bridge, the process lists and usage, the property.

What crosses the panel<->agent boundary is tested here against the real thing:
a real `hostagent serve` in the host namespace of a throwaway "lan" world
(tests/agent/conftest.py), busybox vservers built and run through the
panel's actions, the agent event bridge's stream (bridge.HostStream) in a
thread as `manage.py agent_events` runs it, operations handed to the agent
in threads as the panel does (agent.dispatch), and the pages' websockets
through the panel's ASGI stack:

  - a vserver created, watched, stopped behind the panel's back, every step
    on the pages without a reload;
  - a start, a stop, a restart and a halt from inside, their statuses and
    operations' progress on the pages;
  - many pages watching one guest's processes and usage cost one agent
    stream, and none once they leave; the guest's own rows and its cgroup's
    figures; a stopped guest says so;
  - the process stream and the bridge's stream come back after the agent
    restarts, and the bridge catches up on what it missed;

each ending, where pages are open, with the property: what the pages hold
equals a fresh fetch. Both channel layers where pages are involved.
(tests/panel/live/agentfake.py keeps what a real agent cannot do on demand:
a listener that falls behind.)

Root only (namespaces, cgroups); the agent and the guests are ended at
teardown, failed test or not.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings

from hostagent import wire
from hostagent.client import AgentClient
from panel.guests import actions, bridge, consumers, events, processes
from panel.guests.models import Operation, VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership, Plan
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess
from tests.panel.live.helpers import (
    closed_with,
    connect,
    messages_until,
    run,
    session_cookie,
    sync,
)
from tests.panel.live.test_live_property import apply, dashboard_fetch, page_state, vserver_fetch

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

lan = agent_conftest.lan
SLOW = 90.0  # seconds a build and start of a busybox guest may take on a loaded machine
N = 3  # pages watching one guest


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


@dataclass
class Real:
    host: Host
    customer: Customer
    owner: Any
    cookie: str
    agent: AgentProcess


@pytest.fixture
def real(lan: Lan, agent: AgentProcess) -> Real:
    """A host on the real agent, a pool on the LAN, a customer with a plan and its owner."""
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = Plan.objects.create(name="live", max_vservers=5, max_ipv4=5, memory_mb=4096,
                               cpu_cores=Decimal(4), disk_gb=20)
    customer = Customer.objects.create(name="Live", slug="live", plan=plan)
    owner = get_user_model().objects.create_user("owner", password=None)
    Membership.objects.create(user=owner, customer=customer, role=RoleChoices.ROLE_OWNER)
    return Real(host, customer, owner, session_cookie(owner), agent)


def build(real: Real, name: str = "web") -> int:
    """A running busybox vserver made through the panel, its operation run to its end."""
    with override_settings(VPANEL_OPERATIONS_INLINE=True):
        vs, op = actions.create_vserver(real.customer, actor=actions.Actor(real.owner),
                                        name=name, hostname=f"{name}.live.test")
    op.refresh_from_db()
    assert op.state == "success", op.error
    assert VServer.objects.get(pk=vs.pk).status == wire.STATE_RUNNING
    return vs.pk


def eventually(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not reached in time: {what}"
        time.sleep(0.05)


async def settle(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.05)


def agent_connections(agent: AgentProcess) -> int:
    """Connections the agent holds open on its socket (its listener aside).

    The sockets in the agent's fd table, matched in /proc/net/unix (the agent's
    network namespace and ours: an accepted socket belongs to its client's)
    with the agent's path and the connected state.
    """
    assert agent.proc is not None
    pid = agent.proc.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    connected = set()
    for table in (f"/proc/{pid}/net/unix", "/proc/self/net/unix"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; St 03: connected.
                if len(cols) >= 8 and cols[5] == "03" and cols[6] in inodes \
                        and cols[7] == str(agent.socket):
                    connected.add(cols[6])
    return len(connected)


def is_rows(m: dict[str, Any]) -> bool:
    return m["type"] == "processes" and m["running"] is True


# --- the bridge: status and progress, as the agent does them -------------------------------------

def test_pages_follow_a_real_agent_through_the_bridge(
        channel_layer: str, real: Real, watcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.1)
    said: list[str] = []
    stream = bridge.HostStream(real.host, said.append).start()

    def create() -> int:
        vs, _ = actions.create_vserver(real.customer, actor=actions.Actor(real.owner),
                                       name="web", hostname="web.live.test")
        return vs.pk

    def stop_behind_the_panels_back() -> None:
        with AgentClient(real.agent.socket) as c:
            c.run(c.state("web", "stop", force=True))

    async def go() -> None:
        dash, state = await connect("/ws/vservers/", real.cookie)
        seen = page_state()
        apply(seen, state)
        vs_id = await sync(create)()
        got = await messages_until(dash, lambda m: m["type"] == "vserver" and m["vserver"][
            "status"] == "running" and m["vserver"]["operation"] is None, timeout=SLOW)
        for m in got:
            apply(seen, m)
        statuses = [m["vserver"]["status"] for m in got if m["type"] == "vserver"]
        # 'starting' is the bridge's alone: the panel's create only says building, then
        # reads the end state back; the agent's event made the page show it at once.
        assert {"building", "starting", "running"} <= set(statuses), statuses
        progress = [m["vserver"]["operation"]["progress"] for m in got
                    if m["type"] == "vserver" and m["vserver"]["operation"]]
        assert progress == sorted(progress) and progress[-1] >= 70, progress
        # The customer's bars took the new vserver as it came.
        assert [b["used"] for b in seen["plans"][real.customer.pk]["bars"]
                if b["key"] == "max_vservers"] == ["1"]

        # Two pages watch its processes: one stream to the agent, the guest's own rows.
        pages = [(await connect(f"/ws/vservers/{vs_id}/", real.cookie))[0] for _ in range(2)]
        for page in pages:
            await page.send_json_to({"type": "watch-processes"})
        for page in pages:
            rows = (await messages_until(page, is_rows, timeout=15))[-1]
            assert rows["total"] >= 1 and any(r["pid"] == 1 for r in rows["rows"]), rows
        assert watcher.streams() == 1 and watcher.watchers(vs_id) == 2

        # Stopped on the host by someone else: the pages know within the event's time,
        # not at the reconciler's next pass.
        await sync(stop_behind_the_panels_back)()
        got = await messages_until(dash, lambda m: m["type"] == "vserver"
                                   and m["vserver"]["status"] == "stopped", timeout=30)
        for m in got:
            apply(seen, m)
        rows = (await messages_until(pages[0], lambda m: m["type"] == "processes"
                                     and m["running"] is False, timeout=15))[-1]
        assert rows["rows"] == []
        for page in pages:
            await page.disconnect()

        # The property, against the real thing.
        await sync(events.vserver_changed)(vs_id)
        for m in await messages_until(dash, lambda m: m["type"] == "vserver"):
            apply(seen, m)
        assert seen == await sync(dashboard_fetch)(real.owner)
        await dash.disconnect()

    try:
        run(go)
    finally:
        real.agent.kill(signal.SIGTERM)  # ends the bridge's stream, so that it sees the stop
        stream.stop()
        stream.thread.join(15)
    vs = VServer.objects.get(name="web")
    assert (vs.status, vs.context_id, vs.init_pid) == (wire.STATE_STOPPED, None, None)
    assert said and said[0].startswith("host lanhost: listening")


def test_a_real_restart_stop_start_and_halt_reach_the_pages_with_their_progress(
        channel_layer: str, real: Real, monkeypatch: pytest.MonkeyPatch) -> None:
    vs_id = build(real)
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.1)
    stream = bridge.HostStream(real.host, lambda s: None).start()
    eventually(lambda: stream.opened == 1, what="the bridge's stream")
    actor = actions.Actor(real.owner)

    def act(verb: str) -> int:
        vs = VServer.objects.get(pk=vs_id)
        return int(getattr(actions, f"{verb}_vserver")(vs, actor=actor).pk)

    def halt_from_inside() -> None:
        with AgentClient(real.agent.socket) as c:
            # The exec ends with its guest: whatever it reports, the guest's state tells.
            c.wait(c.exec("web", ["/bin/sh", "-c", "halt -f"]), timeout=15)

    async def go() -> None:
        page, first = await connect(f"/ws/vservers/{vs_id}/", real.cookie)
        dash, state = await connect("/ws/vservers/", real.cookie)
        mine, theirs = page_state(), page_state()
        apply(mine, first)
        apply(theirs, state)

        async def drain() -> None:
            while not await page.receive_nothing(timeout=0.5):
                apply(mine, await page.receive_json_from())
            while not await dash.receive_nothing(timeout=0.5):
                apply(theirs, await dash.receive_json_from())

        for verb, between, end in (("restart", "restarting", "running"),
                                   ("stop", "stopping", "stopped"),
                                   ("start", "starting", "running")):
            await drain()
            op_id = await sync(act)(verb)
            got = await messages_until(page, lambda m, op_id=op_id, end=end: m["vserver"][
                "recent"][0]["id"] == op_id and m["vserver"]["recent"][0]["done"]
                and m["vserver"]["status"] == end, timeout=SLOW)
            for m in got:
                apply(mine, m)
            statuses = [m["vserver"]["status"] for m in got]
            assert statuses[0] == between and statuses[-1] == end, (verb, statuses)
            ours = [m["vserver"]["recent"][0] for m in got]
            assert [o["progress"] for o in ours] == sorted(o["progress"] for o in ours), ours
            assert (ours[-1]["kind"], ours[-1]["state"], ours[-1]["progress"]) == (
                verb, "success", 100), ours[-1]
            # Under way while it ran, then no longer (the dashboard's "in progress").
            assert any(m["vserver"]["operation"] for m in got) and got[-1]["vserver"][
                "operation"] is None
            vs = got[-1]["vserver"]
            assert (vs["context_id"] is None) == (end == "stopped"), vs
        # A halt from inside: the agent's event, through the bridge, says how it ended.
        await sync(halt_from_inside)()
        got = await messages_until(page, lambda m: m["type"] == "vserver"
                                   and m["vserver"]["status"] == "stopped", timeout=30)
        for m in got:
            apply(mine, m)
        assert got[-1]["vserver"]["status_message"].startswith("stopped:"), got[-1]
        # The pages, then, are what a fresh load shows.
        for m in await messages_until(dash, lambda m: m["type"] == "vserver" and m[
                "vserver"]["status_message"].startswith("stopped:")):
            apply(theirs, m)
        await drain()
        assert mine == await sync(vserver_fetch)(vs_id)
        assert theirs == await sync(dashboard_fetch)(real.owner)
        await page.disconnect()
        await dash.disconnect()

    try:
        run(go)
    finally:
        stream.stop()
        real.agent.kill(signal.SIGTERM)
        stream.thread.join(15)
    assert set(Operation.objects.values_list("state", flat=True)) == {"success"}


# --- processes and usage: one stream however many watch -----------------------------------------

def test_pages_watching_a_real_guest_share_one_agent_stream_and_its_usage(
        channel_layer: str, real: Real, watcher: Any) -> None:
    vs_id = build(real)
    watcher.interval = 0.5  # the agent's shortest: the test need not wait 2 s a sample
    agent = real.agent

    def usage_answer(name: str) -> tuple[int, Any]:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket)),
                          base_url="http://agent", timeout=10) as http:
            resp = http.get(f"/1.0/guests/{name}/usage")
            return resp.status_code, resp.json()

    def stop() -> None:
        with AgentClient(agent.socket) as c:
            c.run(c.state("web", "stop", force=True))

    async def go() -> None:
        assert agent_connections(agent) == 0
        pages = [(await connect(f"/ws/vservers/{vs_id}/", real.cookie))[0] for _ in range(N)]
        # Connected, not watching: nothing is asked of the agent.
        await asyncio.sleep(0.5)
        assert agent_connections(agent) == 0 and watcher.tasks() == 0
        await pages[0].send_json_to({"type": "watch-processes"})
        await messages_until(pages[0], is_rows, timeout=15)
        alone = agent_connections(agent)
        assert alone >= 1
        for page in pages[1:]:
            await page.send_json_to({"type": "watch-processes"})
        for page in pages:
            msg = (await messages_until(page, is_rows, timeout=15))[-1]
            # The guest's own processes, its own pids (init is 1 inside).
            assert any(r["pid"] == 1 for r in msg["rows"]), msg
            u = msg["usage"]
            # Its cgroup's figures, as the agent reads them: what the bars show.
            assert u["processes"] >= 1 and u["memory"] is not None and u["memory"] > 0, u
            assert u["cpu"] >= 0 and u["rss"] > 0, u
        # N pages: the cost of one, to the agent and in this process.
        assert agent_connections(agent) == alone
        assert (watcher.streams(), watcher.opened, watcher.watchers(vs_id)) == (1, 1, N)

        # The agent's answer for one guest, as the watcher asks it.
        status, body = await sync(usage_answer)("web")
        assert status == 200 and wire.Usage.from_json(body).processes >= 1, body
        assert (await sync(usage_answer)("nope"))[0] == 404

        # A late page gets the last sample at once, from this process: no new stream.
        late, _ = await connect(f"/ws/vservers/{vs_id}/", real.cookie)
        await late.send_json_to({"type": "watch-processes"})
        assert is_rows(await late.receive_json_from(timeout=15))
        assert watcher.opened == 1

        # Stopped: the pages are told, with nothing to show.
        await sync(stop)()
        for page in [*pages, late]:
            got = await messages_until(page, lambda m: m["type"] == "processes"
                                       and m["running"] is False, timeout=30)
            assert got[-1]["rows"] == [] and got[-1]["total"] == 0
        assert (await sync(usage_answer)("web"))[0] == 409

        # Pages leave; the last one here loses its access rather than closing: either
        # way, the last to go closes the stream, and nothing is asked of the agent after.
        for page in pages:
            await page.disconnect()
        assert watcher.watchers(vs_id) == 1 and agent_connections(agent) == alone
        await sync(lambda: Membership.objects.filter(user=real.owner).delete())()
        assert await closed_with(late, connect=False) == (consumers.CLOSE_MISSING,
                                                          "no such vserver")
        await settle(lambda: agent_connections(agent) == 0, what="the stream closed")
        assert watcher.streams() == 0 and watcher.tasks() == 0
        await asyncio.sleep(1.5)
        assert agent_connections(agent) == 0

    run(go)


def test_the_process_stream_comes_back_after_the_agent_restarts(
        channel_layer: str, real: Real, watcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    vs_id = build(real)
    watcher.interval = 0.5
    monkeypatch.setattr(processes, "BACKOFF_MIN", 0.2)
    monkeypatch.setattr(processes, "BACKOFF_MAX", 1.0)
    agent = real.agent

    def init_pid() -> int | None:
        with AgentClient(agent.socket) as c:
            return c.guest("web").init_pid

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{vs_id}/", real.cookie)
        await page.send_json_to({"type": "watch-processes"})
        await messages_until(page, is_rows, timeout=15)
        before = await sync(init_pid)()
        # The agent stops (its guests go on): the page is told, the watcher tries again.
        await sync(agent.stop)()
        got = await messages_until(page, lambda m: m["type"] == "processes"
                                   and m["error"] is not None, timeout=15)
        assert got[-1]["running"] is None and "agent" in got[-1]["error"]
        await sync(agent.start)()
        # Back: the same guest (re-adopted by the new agent, its same init) on the page.
        after = (await messages_until(page, is_rows, timeout=30))[-1]
        assert any(r["pid"] == 1 for r in after["rows"]) and await sync(init_pid)() == before
        assert watcher.opened == 2 and watcher.streams() == 1
        await page.disconnect()
        await settle(lambda: agent_connections(agent) == 0, what="the stream closed")

    run(go)


# --- the bridge's own stream -------------------------------------------------------------------

def test_the_bridge_catches_up_after_a_real_agent_restarts(
        real: Real, monkeypatch: pytest.MonkeyPatch) -> None:
    vs_id = build(real)
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.1)
    monkeypatch.setattr(bridge, "BACKOFF_MAX", 1.0)
    agent = real.agent
    running = (wire.STATE_RUNNING, VServer.objects.get(pk=vs_id).context_id)
    # What the panel holds is stale before the bridge ever listens.
    VServer.objects.filter(pk=vs_id).update(status=wire.STATE_UNKNOWN, context_id=None)
    said: list[str] = []
    stream = bridge.HostStream(real.host, said.append).start()

    def status() -> tuple[str, int | None]:
        vs = VServer.objects.get(pk=vs_id)
        return vs.status, vs.context_id

    try:
        # Opened: the status set afresh from the agent, before any event.
        eventually(lambda: stream.opened == 1 and bool(said), what="the stream")
        assert said[0].startswith("host lanhost: listening") and "1 status set afresh" in said[0]
        assert status() == running
        # The agent goes away; a change it would have told of is missed meanwhile.
        agent.stop()
        eventually(lambda: any("trying again" in s for s in said), what="the retry")
        VServer.objects.filter(pk=vs_id).update(status=wire.STATE_STOPPED, context_id=None)
        agent.start()
        # Back: the bridge reopens and sets what the agent says, the guest it re-adopted.
        eventually(lambda: stream.opened >= 2 and status() == running, what="the catch-up")
        # And follows its events again: stopped behind the panel's back.
        with AgentClient(agent.socket) as c:
            c.run(c.state("web", "stop", force=True))
        eventually(lambda: status() == (wire.STATE_STOPPED, None), what="the stop event")
    finally:
        stream.stop()
        agent.kill(signal.SIGTERM)  # ends the stream the thread reads, so that it sees the stop
        stream.thread.join(15)
    assert not stream.thread.is_alive()
