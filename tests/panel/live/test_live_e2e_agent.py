"""The live pages against a real agent: the bridge, the process lists, the property.

A real `hostagent serve` in the host namespace of a throwaway "lan" world
(tests/agent/conftest.py), the agent event bridge's stream (bridge.HostStream)
in a thread as `manage.py agent_events` runs it, operations handed to the
agent in threads as the panel does (agent.dispatch), and the pages' websockets
through the panel's ASGI stack. A busybox vserver is created, watched (its
real processes), stopped behind the panel's back, and the pages must show
every step without a reload, then equal a fresh fetch. Both channel layers.

Root only (namespaces, cgroups); the agent and the guests are ended at
teardown, failed test or not.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from hostagent import wire
from hostagent.client import AgentClient
from panel.guests import actions, bridge, events
from panel.guests.models import VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership, Plan
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess
from tests.panel.live.helpers import connect, messages_until, run, session_cookie, sync
from tests.panel.live.test_live_property import apply

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

lan = agent_conftest.lan
SLOW = 90.0  # seconds a build and start of a busybox guest may take on a loaded machine


@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


def test_pages_follow_a_real_agent_through_the_bridge(
        channel_layer: str, lan: Lan, agent: AgentProcess, watcher: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.1)
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = Plan.objects.create(name="live", max_vservers=5, max_ipv4=5, memory_mb=4096,
                               cpu_cores=Decimal(4), disk_gb=20)
    customer = Customer.objects.create(name="Live", slug="live", plan=plan)
    owner = get_user_model().objects.create_user("owner", password=None)
    Membership.objects.create(user=owner, customer=customer, role=RoleChoices.ROLE_OWNER)
    cookie = session_cookie(owner)
    said: list[str] = []
    stream = bridge.HostStream(host, said.append).start()

    def create() -> int:
        vs, _ = actions.create_vserver(customer, actor=actions.Actor(owner), name="web",
                                       hostname="web.live.test")
        return vs.pk

    def stop_behind_the_panels_back() -> None:
        with AgentClient(agent.socket) as c:
            c.run(c.state("web", "stop", force=True))

    async def go() -> None:
        dash, state = await connect("/ws/vservers/", cookie)
        seen: dict[int, dict[str, Any]] = {}
        apply(seen, state)
        vs_id = await sync(create)()
        got = await messages_until(dash, lambda m: m["type"] == "vserver" and m["vserver"][
            "status"] == "running" and m["vserver"]["operation"] is None, timeout=SLOW)
        for m in got:
            apply(seen, m)
        statuses = [m["vserver"]["status"] for m in got]
        # 'starting' is the bridge's alone: the panel's create only says building, then
        # reads the end state back; the agent's event made the page show it at once.
        assert {"building", "starting", "running"} <= set(statuses), statuses
        progress = [m["vserver"]["operation"]["progress"] for m in got
                    if m["vserver"]["operation"]]
        assert progress == sorted(progress) and progress[-1] >= 70, progress

        # Two pages watch its processes: one stream to the agent, the guest's own rows.
        pages = [(await connect(f"/ws/vservers/{vs_id}/", cookie))[0] for _ in range(2)]
        for page in pages:
            await page.send_json_to({"type": "watch-processes"})
        for page in pages:
            rows = (await messages_until(page, lambda m: m["type"] == "processes"
                                         and m["running"] is True, timeout=15))[-1]
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
        assert seen == await sync(events.state_for)(owner)
        await dash.disconnect()

    try:
        run(go)
    finally:
        agent.kill(signal.SIGTERM)  # ends the bridge's stream, so that it sees the stop
        stream.stop()
        stream.thread.join(15)
    vs = VServer.objects.get(name="web")
    assert (vs.status, vs.context_id, vs.init_pid) == (wire.STATE_STOPPED, None, None)
    assert said and said[0].startswith("host lanhost: listening")
