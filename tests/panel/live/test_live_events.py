"""What the live pages are told (panel/guests/consumers.py), on both channel layers.

A dashboard starts with every vserver its user may see, then hears of each
change of them (and of no other tenant's); a vserver page starts with its
vserver and hears of its status and operation's progress. The changes come
from the actions and from the agent event bridge's handler fed agent-shaped
events (panel/guests/bridge.py), as in production; no agent is needed.
"""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from hostagent import wire
from panel.guests import actions, bridge, consumers, events
from panel.guests.choices import (
    STATUS_COLOURS,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from tests.panel.live.agentfake import (
    StubClient,
    agent_operation,
    lifecycle_event,
    operation_event,
)
from tests.panel.live.helpers import (
    World,
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
def world(channel_layer: str, monkeypatch: pytest.MonkeyPatch) -> World:
    # No agent: operations are recorded, never handed to one; the tests play its part.
    monkeypatch.setattr(actions, "_dispatch", lambda op_id: None)
    return make_world()


def test_the_dashboard_starts_with_what_its_user_may_see(world: World) -> None:
    cookies = {who: session_cookie(world.users[who]) for who in ("alice", "bob", "staff")}

    async def go() -> None:
        for who, names in (("alice", ["shop"]), ("bob", ["bobs"]), ("staff", ["bobs", "shop"])):
            comm, state = await connect("/ws/vservers/", cookies[who])
            assert state["type"] == "state"
            assert sorted(v["name"] for v in state["vservers"]) == names, who
            fetched = await sync(events.state_for)(world.users[who])
            assert {v["id"]: v for v in state["vservers"]} == fetched
            await comm.disconnect()

    run(go)


def test_a_start_reaches_the_page_and_its_tenants_dashboards_only(world: World) -> None:
    olga = world.users["olga"]

    def start() -> Operation:
        return actions.start_vserver(VServer.objects.get(pk=world.vs.pk),
                                     actor=actions.Actor(olga))

    cookies = {who: session_cookie(world.users[who]) for who in ("olga", "alice", "bob", "staff")}

    async def go() -> None:
        page, first = await connect(f"/ws/vservers/{world.vs.pk}/", cookies["olga"])
        assert first["vserver"]["status"] == VServerStatusChoices.STATUS_STOPPED
        mine, _ = await connect("/ws/vservers/", cookies["alice"])
        theirs, _ = await connect("/ws/vservers/", cookies["bob"])
        staff, _ = await connect("/ws/vservers/", cookies["staff"])
        op = await sync(start)()
        for comm in (page, mine, staff):
            msg = await comm.receive_json_from()
            assert msg["type"] == "vserver" and isinstance(msg["ts"], float)
            vs = msg["vserver"]
            assert (vs["id"], vs["status"], vs["status_display"], vs["badge"], vs["busy"]) == (
                world.vs.pk, "starting", "Starting",
                STATUS_COLOURS[VServerStatusChoices.STATUS_STARTING], True)
            assert vs["operation"] == {
                "id": op.pk, "kind": "start", "kind_display": "Start", "state": "pending",
                "state_display": "Pending", "badge": "secondary", "progress": 0, "message": ""}
        await no_message(theirs)
        for comm in (page, mine, theirs, staff):
            await comm.disconnect()

    run(go)


def test_the_bridge_shows_building_starting_progress_and_the_end_at_once(
        world: World) -> None:
    """The agent's events, through the bridge's handler, as they happen: no waiting for
    the panel's operation thread to look."""
    olga, host = world.users["olga"], world.host
    agent = StubClient()
    agent.set("shop", wire.STATE_STOPPED)
    theirs = agent_operation("start", "shop", wire.OP_RUNNING)

    def start_and_follow() -> None:
        op = actions.start_vserver(VServer.objects.get(pk=world.vs.pk),
                                   actor=actions.Actor(olga))
        # What agent._Run.follow records once the agent has taken the operation.
        Operation.objects.filter(pk=op.pk).update(agent_operation=theirs["id"])

    def agent_says(*evs: wire.Event) -> None:
        for ev in evs:
            bridge.handle(host, ev, agent)  # type: ignore[arg-type]

    cookie = session_cookie(olga)

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await sync(start_and_follow)()
        await messages_until(page, lambda m: m["vserver"]["status"] == "starting")
        await sync(agent_says)(operation_event({**theirs, "progress": 40,
                                                "message": "mounting"}))
        msg = await page.receive_json_from()
        assert msg["vserver"]["operation"]["progress"] == 40
        assert msg["vserver"]["operation"]["state"] == OperationStateChoices.STATE_RUNNING
        assert msg["vserver"]["operation"]["message"] == "mounting"
        agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
        await sync(agent_says)(
            operation_event({**theirs, "state": wire.OP_SUCCESS, "progress": 100,
                             "result": {"context": 49152, "init_pid": 4242}}),
            lifecycle_event("shop", wire.EVENT_GUEST_STARTED, wire.STATE_RUNNING,
                            operation=theirs["id"]))
        got = await messages_until(page, lambda m: m["vserver"]["status"] == "running")
        vs = got[-1]["vserver"]
        assert (vs["context_id"], vs["init_pid"], vs["operation"], vs["busy"]) == (
            49152, 4242, None, False)
        op = await sync(lambda: Operation.objects.get(agent_operation=theirs["id"]))()
        assert (op.state, op.progress) == (OperationStateChoices.STATE_SUCCESS, 100)
        # Behind the panel's back: it halts from inside.
        agent.set("shop", wire.STATE_STOPPED)
        await sync(agent_says)(lifecycle_event("shop", wire.EVENT_GUEST_EXITED,
                                               wire.STATE_STOPPED, how="halt"))
        vs = (await page.receive_json_from())["vserver"]
        assert (vs["status"], vs["context_id"], vs["status_message"]) == (
            "stopped", None, "stopped: halted from inside")
        await page.disconnect()

    run(go)


def test_what_is_sent_is_read_after_the_change_not_taken_from_the_message(
        world: World) -> None:
    """A late or forged message cannot make a page show what the database does not say."""
    cookie = session_cookie(world.users["alice"])

    def stale_message() -> None:
        layer = get_channel_layer()
        forged: dict[str, Any] = {"id": world.vs.pk, "status": "running", "name": "x"}
        async_to_sync(layer.group_send)(f"vserver-{world.vs.pk}", {
            "type": "vserver.changed", "vserver": forged, "ts": 0.0, "eid": "e1"})

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await sync(stale_message)()
        vs = (await page.receive_json_from())["vserver"]
        assert (vs["status"], vs["name"]) == ("stopped", "shop")
        await page.disconnect()

    run(go)


def test_one_read_of_a_change_serves_every_page_of_this_process(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = consumers._read_snapshot

    def counted(vs_id: int) -> dict[str, Any] | None:
        reads.append(vs_id)
        return real(vs_id)

    monkeypatch.setattr(consumers, "_read_snapshot", counted)
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        pages = [(await connect(f"/ws/vservers/{world.vs.pk}/", cookie))[0] for _ in range(5)]
        dashes = [(await connect("/ws/vservers/", cookie))[0] for _ in range(5)]
        reads.clear()
        await sync(events.vserver_changed)(world.vs.pk)
        for comm in pages + dashes:
            assert (await comm.receive_json_from())["vserver"]["id"] == world.vs.pk
            await comm.disconnect()
        assert reads == [world.vs.pk]

    run(go)


def test_a_new_vserver_appears_on_the_dashboard_and_a_deleted_one_goes(world: World) -> None:
    olga = world.users["olga"]

    def create() -> int:
        vs, _ = actions.create_vserver(world.a, actor=actions.Actor(olga), name="blog")
        return vs.pk

    def deleted(vs_id: int) -> None:
        VServer.objects.filter(pk=vs_id).delete()
        events.vserver_changed(vs_id, customer_id=world.a.pk)

    alice, bob = session_cookie(world.users["alice"]), session_cookie(world.users["bob"])

    async def go() -> None:
        dash, _ = await connect("/ws/vservers/", alice)
        other, _ = await connect("/ws/vservers/", bob)
        new = await sync(create)()
        msg = await dash.receive_json_from()
        assert (msg["vserver"]["id"], msg["vserver"]["status"]) == (new, "building")
        await sync(deleted)(new)
        assert await dash.receive_json_from() == {"type": "deleted", "vserver": {"id": new},
                                                  "ts": pytest.approx(msg["ts"], abs=60)}
        await no_message(other)
        await dash.disconnect()
        await other.disconnect()

    run(go)


def test_one_membership_query_per_change_for_every_page_of_this_process(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Access is checked again for every event, but once for all the pages of a customer's
    users in this process, not once a page."""
    asked: list[tuple[int, frozenset[int]]] = []
    real = consumers._members_among

    def counted(customer_id: int, user_ids: Any) -> frozenset[int]:
        ids = frozenset(user_ids)
        asked.append((customer_id, ids))
        return real(customer_id, ids)

    monkeypatch.setattr(consumers, "_members_among", counted)
    alice, olga = session_cookie(world.users["alice"]), session_cookie(world.users["olga"])
    path = f"/ws/vservers/{world.vs.pk}/"

    async def go() -> None:
        pages = [(await connect(path, c))[0] for c in (alice, alice, olga, olga)]
        dashes = [(await connect("/ws/vservers/", c))[0] for c in (alice, olga)]
        asked.clear()
        await sync(events.vserver_changed)(world.vs.pk)
        for comm in pages + dashes:
            assert (await comm.receive_json_from())["type"] == "vserver"
        both = frozenset({world.users["alice"].pk, world.users["olga"].pk})
        assert asked == [(world.a.pk, both)]
        for comm in pages + dashes:
            await comm.disconnect()
        assert world.a.pk not in consumers._AUDIENCE  # every page counted out

    run(go)
