"""Who may have a live page (panel/guests/consumers.py), on both channel layers.

Refused with a 4xxx code, after a `closing` word that says why: no session, a
session that owes its second factor, another tenant's vserver (exactly as a
missing one), and later, on an open socket: a logout (at once, through
Django's user_logged_out), a lost membership (at once, and on every event and
message), a deactivated user. A foreign Origin never reaches a consumer: the
origin validator denies the handshake itself.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import RequestFactory
from django_otp.plugins.otp_totp.models import TOTPDevice

from panel.guests import actions, consumers, events
from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.models import Membership
from tests.panel.live.helpers import (
    World,
    closed_with,
    communicator,
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
    # No agent here: an action's operation is recorded and never handed to one.
    monkeypatch.setattr(actions, "_dispatch", lambda op_id: None)
    return make_world()


def test_refused_without_a_session_or_with_a_made_up_one(world: World) -> None:
    async def go() -> None:
        for path in ("/ws/vservers/", f"/ws/vservers/{world.vs.pk}/"):
            code, reason = await closed_with(communicator(path))
            assert (code, reason) == (consumers.CLOSE_LOGIN, "log in first")
            code, _ = await closed_with(communicator(path, "not-a-session-key"))
            assert code == consumers.CLOSE_LOGIN

    run(go)


def test_a_foreign_origin_is_denied_before_any_consumer(world: World) -> None:
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        for origin in (b"http://evil.example", b"null", None):
            comm = communicator(f"/ws/vservers/{world.vs.pk}/", cookie, origin=origin)
            connected, code = await comm.connect(timeout=5)
            # The handshake itself is refused (HTTP 403 under Daphne): no word, no accept.
            assert not connected, origin
            assert code in (None, 1000, 403), code
        # The same session from the panel's own origin is let in.
        comm, first = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        assert first["vserver"]["id"] == world.vs.pk
        await comm.disconnect()

    run(go)


def test_another_tenants_vserver_is_refused_exactly_like_a_missing_one(world: World) -> None:
    bob = session_cookie(world.users["bob"])

    async def go() -> None:
        theirs = await closed_with(communicator(f"/ws/vservers/{world.vs.pk}/", bob))
        missing = await closed_with(communicator(f"/ws/vservers/{world.vs.pk + 1000}/", bob))
        assert theirs == missing == (consumers.CLOSE_MISSING, "no such vserver")
        # Their own is fine, and staff may see both.
        comm, first = await connect(f"/ws/vservers/{world.theirs.pk}/", bob)
        assert first["vserver"]["name"] == "bobs"
        await comm.disconnect()

    run(go)
    staff = session_cookie(world.users["staff"])

    async def staff_sees() -> None:
        comm, first = await connect(f"/ws/vservers/{world.vs.pk}/", staff)
        assert first["vserver"]["name"] == "shop"
        await comm.disconnect()

    run(staff_sees)


def test_a_session_that_owes_its_second_factor_is_refused(world: World) -> None:
    alice = world.users["alice"]
    TOTPDevice.objects.create(user=alice, name="phone", confirmed=True)
    cookie = session_cookie(alice)  # the password step only

    async def go() -> None:
        for path in ("/ws/vservers/", f"/ws/vservers/{world.vs.pk}/"):
            assert await closed_with(communicator(path, cookie)) == (consumers.CLOSE_LOGIN,
                                                                     "log in first")

    run(go)


def test_logout_closes_the_sessions_sockets_at_once_and_no_other(world: World) -> None:
    alice = world.users["alice"]
    mine, other_device = session_cookie(alice), session_cookie(alice)

    def log_out(key: str) -> None:
        # What Django's LogoutView does with this session: the signal, then the flush.
        from importlib import import_module

        from django.conf import settings
        from django.contrib.auth import logout

        request = RequestFactory().post("/accounts/logout/")
        request.session = import_module(settings.SESSION_ENGINE).SessionStore(key)
        request.user = alice
        logout(request)

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", mine)
        dash, _ = await connect("/ws/vservers/", mine)
        elsewhere, _ = await connect("/ws/vservers/", other_device)
        await sync(log_out)(mine)
        assert await closed_with(page, connect=False) == (consumers.CLOSE_LOGIN, "logged out")
        assert await closed_with(dash, connect=False) == (consumers.CLOSE_LOGIN, "logged out")
        # Another device's session of the same user stays.
        await elsewhere.send_json_to({"type": "ping"})
        assert (await elsewhere.receive_json_from())["type"] == "pong"
        await elsewhere.disconnect()
        # And the ended session is refused from then on.
        assert (await closed_with(communicator("/ws/vservers/", mine)))[0] == \
            consumers.CLOSE_LOGIN

    run(go)


def test_a_lost_membership_closes_the_vserver_page_and_empties_the_dashboard(
        world: World) -> None:
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        dash, state = await connect("/ws/vservers/", cookie)
        assert [v["id"] for v in state["vservers"]] == [world.vs.pk]
        await sync(lambda: Membership.objects.filter(user=world.users["alice"]).delete())()
        assert await closed_with(page, connect=False) == (consumers.CLOSE_MISSING,
                                                          "no such vserver")
        # The dashboard stays (a user with no customer has one too), without the vserver
        # and without the customer's usage bars.
        got = await messages_until(dash, lambda m: m["type"] == "plan")
        assert next(m for m in got if m["type"] == "deleted")["vserver"] == {"id": world.vs.pk}
        assert got[-1]["plan"] == {"customer": world.a.pk, "bars": None}
        # Its events no longer reach it.
        await sync(events.vserver_changed)(world.vs.pk)
        await no_message(dash)
        await dash.disconnect()

    run(go)


def test_access_is_checked_again_on_every_event_and_message(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the membership signal (a change made behind the ORM's back, say), the next
    event or message finds out."""
    from panel.guests import signals

    monkeypatch.setattr(signals, "_tell", lambda user_id, message: None)
    cookie = session_cookie(world.users["alice"])

    def drop_membership() -> None:
        Membership.objects.filter(user=world.users["alice"]).delete()

    async def go() -> None:
        on_event, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        on_message, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        dash, _ = await connect("/ws/vservers/", cookie)
        await sync(drop_membership)()
        await no_message(on_event)
        await sync(events.vserver_changed)(world.vs.pk)  # an event: checked before sending
        assert await closed_with(on_event, connect=False) == (consumers.CLOSE_MISSING,
                                                              "no such vserver")
        got = await messages_until(dash, lambda m: m["type"] == "deleted")
        assert got[-1]["vserver"] == {"id": world.vs.pk}
        await on_message.send_json_to({"type": "ping"})  # a message: checked before answering
        assert await closed_with(on_message, connect=False) == (consumers.CLOSE_MISSING,
                                                                "no such vserver")
        await dash.disconnect()

    run(go)


def test_a_deactivated_user_is_closed_at_once(world: World) -> None:
    cookie = session_cookie(world.users["alice"])

    def deactivate() -> None:
        u = get_user_model().objects.get(username="alice")
        u.is_active = False
        u.save()

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await sync(deactivate)()
        assert (await closed_with(page, connect=False))[0] == consumers.CLOSE_LOGIN

    run(go)


def test_the_periodic_recheck_closes_an_expired_session(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "RECHECK", 0.2)
    cookie = session_cookie(world.users["alice"])

    def expire(key: str) -> None:
        from django.contrib.sessions.models import Session

        Session.objects.filter(session_key=key).delete()

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await sync(expire)(cookie)
        assert await closed_with(page, connect=False) == (
            consumers.CLOSE_LOGIN, "the session has ended: log in again")

    run(go)


def test_nonsense_and_floods_are_refused(world: World) -> None:
    cookie = session_cookie(world.users["alice"])

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await page.send_to(text_data="not json")
        assert (await closed_with(page, connect=False))[0] == consumers.CLOSE_BAD
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        await page.send_json_to({"type": "reboot-the-host"})
        assert (await page.receive_json_from())["type"] == "error"
        for _ in range(consumers.FLOOD):
            await page.send_json_to({"type": "ping"})
        code, _ = await closed_with(page, connect=False)
        assert code == consumers.CLOSE_FLOOD

    run(go)


def test_a_deleted_vserver_closes_its_page(world: World) -> None:
    cookie = session_cookie(world.users["olga"])

    def delete() -> None:
        vs = VServer.objects.get(pk=world.vs.pk)
        actions.delete_vserver(vs, actor=actions.Actor(world.users["olga"]), confirm="shop")

    def deleted_by_the_agent() -> None:
        # No agent here: what the operation does once the agent has deleted it.
        VServer.objects.filter(pk=world.vs.pk).delete()
        events.vserver_changed(world.vs.pk, customer_id=world.a.pk)

    async def go() -> None:
        page, _ = await connect(f"/ws/vservers/{world.vs.pk}/", cookie)
        dash, _ = await connect("/ws/vservers/", cookie)
        await sync(delete)()
        got = await messages_until(page, lambda m: m["type"] == "vserver")
        assert got[-1]["vserver"]["status"] == VServerStatusChoices.STATUS_DELETING
        assert got[-1]["vserver"]["operation"]["kind"] == "delete"
        await sync(deleted_by_the_agent)()
        got = await messages_until(page, lambda m: m["type"] == "deleted")
        assert got[-1]["vserver"] == {"id": world.vs.pk}
        assert (await closed_with(page, connect=False))[0] == consumers.CLOSE_DELETED
        got = await messages_until(dash, lambda m: m["type"] == "deleted")
        assert got[-1]["vserver"] == {"id": world.vs.pk}
        await dash.disconnect()

    run(go)
