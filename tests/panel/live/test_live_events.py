"""What the live pages are told (panel/guests/consumers.py), on both channel layers.

A dashboard starts with every vserver its user may see and the usage bars of
its user's customers, then hears of each change of them (and of no other
tenant's); a vserver page starts with its vserver and its recent operations
and hears of its status and operations' progress. The changes come from the
actions and from what the operation thread records, as in production; no
agent is needed (tests/panel/live/test_live_e2e_agent.py has the real one).
"""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from panel.guests import actions, consumers, events
from panel.guests.choices import (
    STATUS_COLOURS,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
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


def bar(plan: dict[str, Any], key: str) -> dict[str, Any]:
    """One usage bar of a customer's (plan_usage.plan_of)."""
    return next(b for b in plan["bars"] if b["key"] == key)


def test_the_dashboard_starts_with_what_its_user_may_see(world: World) -> None:
    cookies = {who: session_cookie(world.users[who]) for who in ("alice", "bob", "staff")}

    async def go() -> None:
        # Staff see every vserver; the bars are of the customers one is a member of (the
        # dashboard's sections), which staff here is of none.
        for who, names, customers in (("alice", ["shop"], [world.a.pk]),
                                      ("bob", ["bobs"], [world.b.pk]),
                                      ("staff", ["bobs", "shop"], [])):
            comm, state = await connect("/ws/vservers/", cookies[who])
            assert state["type"] == "state"
            assert sorted(v["name"] for v in state["vservers"]) == names, who
            fetched = await sync(events.state_for)(world.users[who])
            assert {v["id"]: v for v in state["vservers"]} == fetched
            assert [p["customer"] for p in state["plans"]] == customers, who
            plans = await sync(events.plans_for)(world.users[who])
            assert {p["customer"]: p for p in state["plans"]} == plans
            await comm.disconnect()

    run(go)


def test_a_vserver_page_follows_its_operations_progress_to_the_end(world: World) -> None:
    """Each step the operation's thread records (agent._Run.progress), then its end: on
    the vserver's page (its recent operations) and its tenant's dashboard (those under
    way), at once."""
    olga = world.users["olga"]
    cookie = session_cookie(olga)

    def start() -> int:
        return actions.start_vserver(VServer.objects.get(pk=world.vs.pk),
                                     actor=actions.Actor(olga)).pk

    def step(op_id: int, **fields: Any) -> None:
        Operation.objects.filter(pk=op_id).update(**fields)
        events.vserver_changed(world.vs.pk)

    def failed_stop() -> int:
        op = actions.stop_vserver(VServer.objects.get(pk=world.vs.pk), actor=actions.Actor(olga))
        step(op.pk, state=OperationStateChoices.STATE_FAILURE, error="x" * 300)
        return op.pk

    async def go() -> None:
        page, first = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        dash, _ = await connect("/ws/vservers/", cookie)
        assert first["vserver"]["recent"] == []
        op_id = await sync(start)()
        for comm in (page, dash):
            assert (await comm.receive_json_from())["vserver"]["operation"]["id"] == op_id
        await sync(step)(op_id, state=OperationStateChoices.STATE_RUNNING, progress=20,
                         message="starting")
        for comm in (page, dash):
            vs = (await comm.receive_json_from())["vserver"]
            op = vs["operation"]
            assert (op["state"], op["progress"], op["message"], op["done"]) == (
                "running", 20, "starting", False)
            assert vs["operations"] == [op]
        await sync(step)(op_id, state=OperationStateChoices.STATE_SUCCESS, progress=100,
                         message="done")
        ended = {}
        for comm in (page, dash):
            ended[comm] = vs = (await comm.receive_json_from())["vserver"]
            assert (vs["operation"], vs["operations"]) == (None, [])
        # Ended, it stays on the vserver's page, with how it ended.
        assert [(o["id"], o["state"], o["progress"], o["done"]) for o in ended[page][
            "recent"]] == [(op_id, "success", 100, True)]
        # A failure shows its error, cut as the page's table cuts it.
        await sync(lambda: VServer.objects.filter(pk=world.vs.pk).update(status="running"))()
        stop_id = await sync(failed_stop)()
        got = await messages_until(page, lambda m: m["vserver"]["recent"][0]["state"]
                                   == "failure")
        failed = got[-1]["vserver"]["recent"][0]
        assert failed["id"] == stop_id and failed["error"] == "x" * 199 + "\u2026"
        assert [o["id"] for o in got[-1]["vserver"]["recent"]] == [stop_id, op_id]
        assert got[-1]["vserver"] == await sync(
            lambda: events.detail(VServer.objects.get(pk=world.vs.pk)))()
        await page.disconnect()
        await dash.disconnect()

    run(go)


def test_new_limits_move_the_usage_bars_of_their_tenants_dashboards_only(
        world: World) -> None:
    olga = world.users["olga"]
    cookies = {who: session_cookie(world.users[who]) for who in ("alice", "bob", "staff")}

    def set_limits() -> None:
        op = actions.set_limits(VServer.objects.get(pk=world.vs.pk), actor=actions.Actor(olga),
                                memory_mb=4096, cpu_cores="2.5")
        # What the operation's thread does once the agent has the new limits.
        Operation.objects.filter(pk=op.pk).update(state=OperationStateChoices.STATE_SUCCESS,
                                                  progress=100)
        events.vserver_changed(world.vs.pk)

    async def go() -> None:
        dashes = {who: (await connect("/ws/vservers/", cookies[who]))[0] for who in cookies}
        _, state = await connect("/ws/vservers/", cookies["alice"])
        before = state["plans"][0]
        assert bar(before, "memory_mb")["used"] == "256"
        await sync(set_limits)()
        vs = (await dashes["alice"].receive_json_from())["vserver"]
        assert (vs["memory_mb"], vs["cpu_cores"]) == (4096, "2.5")
        plan = (await dashes["alice"].receive_json_from())["plan"]
        assert plan["customer"] == world.a.pk
        assert (bar(plan, "memory_mb")["used"], bar(plan, "cpu_cores")["used"]) == ("4096", "2.5")
        assert bar(plan, "memory_mb")["limit"] == "65536" and bar(plan, "memory_mb")[
            "percent"] == 6
        assert plan == (await sync(events.plans_for)(world.users["alice"]))[world.a.pk]
        # Staff see the vserver change, and no bars (not a member of Acme); Bob nothing.
        assert (await dashes["staff"].receive_json_from())["type"] == "vserver"
        await no_message(dashes["staff"])
        await no_message(dashes["bob"])
        # A change that leaves the bars as they are sends none.
        await sync(events.vserver_changed)(world.vs.pk)
        assert (await dashes["alice"].receive_json_from())["type"] == "vserver"
        await no_message(dashes["alice"])
        for comm in dashes.values():
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
                "id": op.pk, "vserver": world.vs.pk, "vserver_name": "shop", "kind": "start",
                "kind_display": "Start", "state": "pending", "state_display": "Pending",
                "badge": "secondary", "progress": 0, "message": "", "error": "",
                "done": False, "created": op.created.isoformat(),
                "created_display": op.created.strftime("%Y-%m-%d %H:%M:%S")}
            assert vs["operations"] == [vs["operation"]]
            # The vserver's page also gets its recent operations (any state): the start.
            assert vs.get("recent", "dashboards: none") == (
                [vs["operation"]] if comm is page else "dashboards: none")
        await no_message(theirs)
        for comm in (page, mine, theirs, staff):
            await comm.disconnect()

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
    reads: list[tuple[str, int]] = []

    def counting(what: str, real: Any) -> Any:
        def counted(an_id: int) -> Any:
            reads.append((what, an_id))
            return real(an_id)
        return counted

    monkeypatch.setattr(consumers, "_read_snapshot",
                        counting("vserver", consumers._read_snapshot))
    monkeypatch.setattr(events, "recent_operations",
                        counting("operations", events.recent_operations))
    monkeypatch.setattr(consumers, "_read_plan", counting("plan", consumers._read_plan))
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        pages = [(await connect(f"/ws/vservers/{world.vs.pk}/", cookie))[0] for _ in range(5)]
        dashes = [(await connect("/ws/vservers/", cookie))[0] for _ in range(5)]
        reads.clear()
        await sync(events.vserver_changed)(world.vs.pk)
        for comm in pages + dashes:
            assert (await comm.receive_json_from())["vserver"]["id"] == world.vs.pk
            await comm.disconnect()
        assert sorted(reads) == [("operations", world.vs.pk), ("plan", world.a.pk),
                                 ("vserver", world.vs.pk)]

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
        # Its customer's usage bars follow: one vserver more.
        plan = (await dash.receive_json_from())["plan"]
        assert plan["customer"] == world.a.pk and bar(plan, "max_vservers")["used"] == "2"
        await sync(deleted)(new)
        assert await dash.receive_json_from() == {"type": "deleted", "vserver": {"id": new},
                                                  "ts": pytest.approx(msg["ts"], abs=60)}
        plan = (await dash.receive_json_from())["plan"]
        assert bar(plan, "max_vservers")["used"] == "1"
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
