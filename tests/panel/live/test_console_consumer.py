"""The console's websocket (panel/guests/console.py), through the panel's real ASGI stack.

Channels' WebsocketCommunicator drives `panel.asgi.application` (origin check,
session cookie, routing) as a browser would. The refusals need no agent: they
happen before the consumer reaches one. The rest run a real agent in the
host namespace of a throwaway "lan" world (tests/agent/conftest.py) with a
busybox vserver created through panel.guests.actions, and check what the
shell inside it answers.

Every test owns its database rows (transaction=True: the consumer's queries
run in other threads) and, where it made them, its agent and guests, ended
at teardown whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from hostagent.client import AgentClient
from panel.asgi import application
from panel.guests import actions, console
from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.choices import AuditResultChoices, IPFamilyChoices, RoleChoices
from panel.hosting.models import AuditLog, Customer, Host, IPPool, Membership, Plan
from tests.agent import conftest as agent_conftest
from tests.agent.conftest import UPLINK, Lan
from tests.helpers import AgentProcess
from tests.panel.factories import make_plan, make_user, make_vserver
from tests.panel.live.helpers import Communicator

pytestmark = [pytest.mark.django_db(transaction=True)]

# The agent tests' fixture (a host and a LAN network namespace), used here as is.
lan = agent_conftest.lan

TIMEOUT = 15.0  # seconds a shell inside a busybox guest may take to answer


def session_cookie(user: Any) -> str:
    c = Client()
    c.force_login(user)
    return c.cookies[settings.SESSION_COOKIE_NAME].value


def communicator(pk: int, cookie: str | None = None, *, cols: int = 80,
                 rows: int = 24) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    if cookie is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    comm = Communicator(application, f"/ws/vservers/{pk}/console/?cols={cols}"
                        f"&rows={rows}", headers=headers)
    comm.scope["client"] = ("127.0.0.1", 50000)
    return comm


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


async def closed_with(comm: WebsocketCommunicator) -> tuple[int, str]:
    """Connect, expect the panel's word and its close; (code, reason)."""
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected, "accepted first, so that the page is told why"
    word = json.loads(await comm.receive_from(timeout=TIMEOUT))
    assert word["type"] == "closing", word
    out = await comm.receive_output(timeout=TIMEOUT)
    assert out == {"type": "websocket.close", "code": word["code"],
                   "reason": word["reason"][:120]}, out
    await comm.wait()
    return word["code"], word["reason"]


# --- refusals, before any agent is reached ---------------------------------------------------

@pytest.fixture
def tenants(db: None) -> dict[str, Any]:
    """Two customers, a user of each, a vserver of the first marked running (no agent)."""
    plan = make_plan("console-plan")
    a = Customer.objects.create(name="Acme", slug="acme", plan=plan)
    b = Customer.objects.create(name="Bobco", slug="bobco", plan=plan)
    alice, bob = make_user("alice"), make_user("bob")
    Membership.objects.create(customer=a, user=alice, role=RoleChoices.ROLE_MEMBER)
    Membership.objects.create(customer=b, user=bob, role=RoleChoices.ROLE_OWNER)
    host = Host.objects.create(name="nowhere", agent_socket="/nonexistent/agent.sock")
    IPPool.objects.create(name="v4", family=IPFamilyChoices.FAMILY_4, network="198.18.2.0/24",
                          first="198.18.2.10", last="198.18.2.250")
    vs = make_vserver(a, host, name="shop", status=VServerStatusChoices.STATUS_RUNNING)
    return {"plan": plan, "a": a, "alice": alice, "bob": bob, "vs": vs, "host": host}


def test_refused_without_a_session(tenants: dict[str, Any]) -> None:
    async def go() -> None:
        code, reason = await closed_with(communicator(tenants["vs"].pk))
        assert code == console.CLOSE_LOGIN and "log in" in reason
        code, _ = await closed_with(communicator(tenants["vs"].pk, "not-a-session-key"))
        assert code == console.CLOSE_LOGIN

    run(go)
    assert not AuditLog.objects.filter(action=console.AUDIT_ACTION).exists()


def test_another_tenants_vserver_is_refused_exactly_like_a_missing_one(
        tenants: dict[str, Any]) -> None:
    bob = session_cookie(tenants["bob"])

    async def go() -> None:
        theirs = await closed_with(communicator(tenants["vs"].pk, bob))
        missing = await closed_with(communicator(tenants["vs"].pk + 1000, bob))
        assert theirs == missing == (console.CLOSE_MISSING, "no such vserver")

    run(go)
    # Nothing is written about a vserver the user may not know exists.
    assert not AuditLog.objects.filter(action=console.AUDIT_ACTION).exists()


def test_refused_for_a_private_guest_and_audited(tenants: dict[str, Any]) -> None:
    VServer.objects.filter(pk=tenants["vs"].pk).update(flags=["private"])
    alice = session_cookie(tenants["alice"])

    async def go() -> None:
        code, reason = await closed_with(communicator(tenants["vs"].pk, alice))
        assert code == console.CLOSE_REFUSED and "'private' flag" in reason, reason

    run(go)
    row = AuditLog.objects.get(action=console.AUDIT_ACTION)
    assert (row.actor, row.result, row.source_ip, row.target_id) == (
        tenants["alice"], AuditResultChoices.RESULT_DENIED, "127.0.0.1", str(tenants["vs"].pk))
    assert "private" in row.detail["reason"]


def test_refused_where_the_plan_has_no_console(tenants: dict[str, Any]) -> None:
    Plan.objects.filter(pk=tenants["plan"].pk).update(console_allowed=False)
    alice = session_cookie(tenants["alice"])

    async def go() -> None:
        code, reason = await closed_with(communicator(tenants["vs"].pk, alice))
        assert code == console.CLOSE_REFUSED
        assert reason == "the plan of Acme does not include the console"

    run(go)
    assert AuditLog.objects.get(action=console.AUDIT_ACTION).result == "denied"


def test_refused_for_a_stopped_vserver(tenants: dict[str, Any]) -> None:
    VServer.objects.filter(pk=tenants["vs"].pk).update(status=VServerStatusChoices.STATUS_STOPPED)
    alice = session_cookie(tenants["alice"])

    async def go() -> None:
        code, reason = await closed_with(communicator(tenants["vs"].pk, alice))
        assert (code, reason) == (console.CLOSE_NOT_RUNNING,
                                  "shop is stopped: the console needs it running")

    run(go)


def test_a_silent_agent_is_said_so(tenants: dict[str, Any]) -> None:
    alice = session_cookie(tenants["alice"])

    async def go() -> None:
        code, reason = await closed_with(communicator(tenants["vs"].pk, alice))
        assert (code, reason) == (console.CLOSE_AGENT, "the host's agent does not answer")

    run(go)
    row = AuditLog.objects.get(action=console.AUDIT_ACTION)
    assert row.result == AuditResultChoices.RESULT_ERROR


def test_the_vserver_page_says_why_there_is_no_console(tenants: dict[str, Any]) -> None:
    Plan.objects.filter(pk=tenants["plan"].pk).update(console_allowed=False)
    c = Client()
    c.force_login(tenants["alice"])
    page = c.get(f"/vservers/{tenants['vs'].pk}/").content.decode()
    assert 'id="btn-console"' in page and "does not include the console" in page
    page = c.get(f"/vservers/{tenants['vs'].pk}/console/").content.decode()
    assert "The console is not available: the plan of Acme does not include" in page
    assert "xterm.js" not in page
    Plan.objects.filter(pk=tenants["plan"].pk).update(console_allowed=True)
    page = c.get(f"/vservers/{tenants['vs'].pk}/console/").content.decode()
    assert f'data-ws-path="/ws/vservers/{tenants["vs"].pk}/console/"' in page
    assert "vendor/xterm-6.0.0/xterm.js" in page and "js/console.js" in page
    # Another tenant's console page is a 404, as its vserver page is.
    c.force_login(tenants["bob"])
    assert c.get(f"/vservers/{tenants['vs'].pk}/console/").status_code == 404


# --- with a real agent and a running busybox vserver ------------------------------------------

@pytest.fixture
def agent(lan: Lan) -> Iterator[AgentProcess]:
    a = AgentProcess(lan.paths, lan.host).start()
    try:
        yield a
    finally:
        a.kill(signal.SIGKILL)


@pytest.fixture
def shop(settings: Any, lan: Lan, agent: AgentProcess) -> dict[str, Any]:
    """A customer with an owner and a member, and its running busybox vserver 'shop'."""
    settings.VPANEL_OPERATIONS_INLINE = True
    host = Host.objects.create(name="lanhost", agent_socket=str(agent.socket),
                               iprootdev=UPLINK, memory_mb=8192, cpu_cores=Decimal(8))
    IPPool.objects.create(name="lan-v4", host=host, family=IPFamilyChoices.FAMILY_4,
                          network=f"{lan.v4(0)}/24", first=lan.v4(10), last=lan.v4(20))
    plan = make_plan("console-e2e")
    customer = Customer.objects.create(name="Shop", slug="shop", plan=plan)
    owner, member = make_user("owner"), make_user("member")
    Membership.objects.create(user=owner, customer=customer, role=RoleChoices.ROLE_OWNER)
    Membership.objects.create(user=member, customer=customer, role=RoleChoices.ROLE_MEMBER)
    vs, _op = actions.create_vserver(customer, actor=actions.Actor(owner), name="shop",
                                     hostname="shop.test")
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_RUNNING, (vs.status, vs.status_message)
    return {"vs": vs, "owner": owner, "member": member, "customer": customer, "agent": agent}


async def read_until(comm: WebsocketCommunicator, pattern: bytes,
                     timeout: float = TIMEOUT) -> re.Match[bytes]:
    """Terminal output until PATTERN (a regex) matches it; the match."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    buf = b""
    while True:
        found = re.search(pattern, buf)
        if found:
            return found
        left = deadline - loop.time()
        assert left > 0, f"no {pattern!r} in {buf[-2000:]!r}"
        out = await comm.receive_output(timeout=left)
        assert out["type"] == "websocket.send", (out, buf[-2000:])
        if out.get("bytes"):
            buf += out["bytes"]
        else:
            raise AssertionError(f"{out['text']} while waiting for {pattern!r} in {buf!r}")


async def closing_word(comm: WebsocketCommunicator) -> dict[str, Any]:
    """Past any terminal output still under way: the panel's last word and its close code."""
    while True:
        out = await comm.receive_output(timeout=TIMEOUT)
        assert out["type"] == "websocket.send", out
        if out.get("text"):
            word: dict[str, Any] = json.loads(out["text"])
            assert word["type"] == "closing", word
            close = await comm.receive_output(timeout=TIMEOUT)
            assert close["type"] == "websocket.close" and close["code"] == word["code"], close
            return word


async def shell_pid(comm: WebsocketCommunicator, tag: str) -> int:
    await comm.send_to(bytes_data=f"echo {tag}-$$-end\n".encode())
    return int((await read_until(comm, rf"{tag}-(\d+)-end".encode())).group(1))


@pytest.mark.slow
def test_bytes_round_trip_resize_and_audit(shop: dict[str, Any]) -> None:
    member = session_cookie(shop["member"])  # any role of the customer may

    async def go() -> None:
        comm = communicator(shop["vs"].pk, member, cols=100, rows=30)
        connected, _ = await comm.connect(timeout=TIMEOUT)
        assert connected
        await comm.send_to(bytes_data=b"echo round-$((6*7)); echo \xc3\xa9t\xc3\xa9\n")
        await read_until(comm, "round-42\r?\n\u00e9t\u00e9".encode())
        await comm.send_to(bytes_data=b"stty size\n")
        await read_until(comm, rb"30 100")
        await comm.send_to(text_data=json.dumps({"type": "resize", "cols": 132, "rows": 43}))
        await comm.send_to(text_data="not json")  # ignored, as is any other type
        await comm.send_to(text_data=json.dumps({"type": "bogus"}))
        await comm.send_to(bytes_data=b"stty size\n")
        await read_until(comm, rb"43 132")
        # A paste: many lines in one frame.
        await comm.send_to(bytes_data=b"".join(b"echo line-%d\n" % i for i in range(50)))
        await read_until(comm, rb"line-49\r?\n")
        await comm.disconnect()

    run(go)
    row = AuditLog.objects.get(action=console.AUDIT_ACTION)
    assert (row.actor, row.result, row.source_ip, row.customer) == (
        shop["member"], AuditResultChoices.RESULT_OK, "127.0.0.1", shop["customer"])
    assert row.detail["reattached"] is False and row.detail["console"]


@pytest.mark.slow
def test_a_reconnect_reattaches_to_the_same_shell_and_exit_ends_it(
        shop: dict[str, Any]) -> None:
    owner = session_cookie(shop["owner"])
    second_login = session_cookie(shop["owner"])
    pk = shop["vs"].pk

    async def go() -> None:
        first = communicator(pk, owner)
        assert (await first.connect(timeout=TIMEOUT))[0]
        pid = await shell_pid(first, "before")
        await first.send_to(bytes_data=b"MARK=kept-$((2+3))\n")
        await first.disconnect()  # a reload, a dropped connection

        again = communicator(pk, owner)
        assert (await again.connect(timeout=TIMEOUT))[0]
        await read_until(again, rb"before-\d+-end")  # the agent replays what it showed
        assert await shell_pid(again, "after") == pid
        await again.send_to(bytes_data=b"echo got-$MARK\n")
        await read_until(again, rb"got-kept-5")

        # Another login of the same user is another session: another shell.
        other = communicator(pk, second_login)
        assert (await other.connect(timeout=TIMEOUT))[0]
        assert await shell_pid(other, "other") != pid
        await other.disconnect()

        # The same session in a second window takes the shell over; the first is told
        # (and its page does not take it back by itself: two windows would fight).
        taker = communicator(pk, owner)
        assert (await taker.connect(timeout=TIMEOUT))[0]
        word = await closing_word(again)
        assert (word["code"], word.get("retry")) == (console.CLOSE_TAKEN_OVER, None), word
        assert await shell_pid(taker, "taken") == pid

        # exit: the page is told, the panel closes, and the next connect is a new shell.
        await taker.send_to(bytes_data=b"exit 3\n")
        while True:
            out = await taker.receive_output(timeout=TIMEOUT)
            if out.get("text"):
                break
        assert json.loads(out["text"]) == {"type": "exit", "code": 3, "reason": "exited"}
        assert (await closing_word(taker))["code"] == console.CLOSE_EXITED
        fresh = communicator(pk, owner)
        assert (await fresh.connect(timeout=TIMEOUT))[0]
        assert await shell_pid(fresh, "fresh") != pid
        await fresh.disconnect()

    run(go)
    rows = list(AuditLog.objects.filter(action=console.AUDIT_ACTION).order_by("id")
                .values_list("detail", flat=True))
    assert [r["reattached"] for r in rows] == [False, True, False, True, False]
    assert rows[0]["console"] == rows[1]["console"] == rows[3]["console"] != rows[4]["console"]


@pytest.mark.slow
def test_logout_expiry_and_a_lost_membership_close_an_open_console(
        shop: dict[str, Any]) -> None:
    from importlib import import_module

    from asgiref.sync import sync_to_async

    owner_a, owner_b = session_cookie(shop["owner"]), session_cookie(shop["owner"])
    member = session_cookie(shop["member"])
    pk = shop["vs"].pk

    def log_out(cookie: str) -> None:
        c = Client()
        c.cookies[settings.SESSION_COOKIE_NAME] = cookie
        assert c.post("/logout/").status_code == 302

    def expire(cookie: str) -> None:  # gone from the store, as an expired session is
        import_module(settings.SESSION_ENGINE).SessionStore(cookie).delete()

    async def go() -> None:
        a, b, m = (communicator(pk, owner_a), communicator(pk, owner_b),
                   communicator(pk, member))
        for comm in (a, b, m):
            assert (await comm.connect(timeout=TIMEOUT))[0]
            await shell_pid(comm, "up")

        # A logout (in another tab) closes that session's console at once, no keystroke
        # needed (user_logged_out, to the group user-ID); the other session's stays.
        # (sync_to_async, not a plain thread: the signal's group_send must reach this loop.)
        await sync_to_async(log_out)(owner_a)
        assert (await closing_word(a))["code"] == console.CLOSE_LOGIN
        await shell_pid(b, "still")

        # A session that ends without a word (expiry): the next keystroke closes it.
        await sync_to_async(expire)(owner_b)
        await asyncio.sleep(console.CHECK_MIN)  # keystrokes within it are not checked again
        await b.send_to(bytes_data=b"echo never\n")
        word = await closing_word(b)
        assert word == {"type": "closing", "code": console.CLOSE_LOGIN,
                        "reason": "log in to use the console (this session has ended)"}

        # The member is removed from the customer: closed at once, like a missing vserver.
        await sync_to_async(lambda: Membership.objects.filter(user=shop["member"]).delete())()
        word = await closing_word(m)
        assert word == {"type": "closing", "code": console.CLOSE_MISSING,
                        "reason": "no such vserver"}

    run(go)
    # The three shells were ended on the agent, not merely left for its idle time.
    with AgentClient(shop["agent"].socket) as c:
        assert c.consoles() == []
