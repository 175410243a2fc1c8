"""Helpers of the live pages' tests: a world of two tenants, sessions, websocket clients.

Clients go through the panel's real ASGI stack (`panel.asgi.application`:
origin check, session cookie, routing), as a browser's would. Sync Django
code (actions, membership changes, logouts) is called through
`database_sync_to_async`, as a view under Daphne is: its events then reach the
consumers in this test's loop whichever channel layer is in use.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from panel.asgi import application
from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership
from tests.panel.factories import make_plan, make_user, make_vserver

__all__ = ["TIMEOUT", "Communicator", "World", "closed_with", "connect", "make_world",
           "messages_until", "no_message", "run", "session_cookie", "sync"]

TIMEOUT = 10.0


@dataclass
class World:
    a: Customer
    b: Customer
    host: Host
    users: dict[str, Any]
    vs: VServer  # tenant A's
    theirs: VServer  # tenant B's


def make_world(socket: str = "/nonexistent/agent.sock") -> World:
    """Tenants A (alice, a member; olga, its owner) and B (bob), staff; a vserver each."""
    plan = make_plan()
    a = Customer.objects.create(name="Acme", slug="acme", plan=plan)
    b = Customer.objects.create(name="Bobco", slug="bobco", plan=plan)
    users = {"alice": make_user("alice"), "olga": make_user("olga"), "bob": make_user("bob"),
             "staff": make_user("root-staff", staff=True)}
    Membership.objects.create(customer=a, user=users["alice"], role=RoleChoices.ROLE_MEMBER)
    Membership.objects.create(customer=a, user=users["olga"], role=RoleChoices.ROLE_OWNER)
    Membership.objects.create(customer=b, user=users["bob"], role=RoleChoices.ROLE_OWNER)
    host = Host.objects.create(name="node1", agent_socket=socket, memory_mb=100_000,
                               cpu_cores=Decimal(64), disk_gb=10_000, max_vservers=100)
    IPPool.objects.create(name="v4", family=IPFamilyChoices.FAMILY_4, network="198.18.2.0/24",
                          first="198.18.2.10", last="198.18.2.250")
    vs = make_vserver(a, host, name="shop", status=VServerStatusChoices.STATUS_STOPPED)
    theirs = make_vserver(b, host, name="bobs", status=VServerStatusChoices.STATUS_STOPPED)
    return World(a=a, b=b, host=host, users=users, vs=vs, theirs=theirs)


def session_cookie(user: Any) -> str:
    c = Client()
    c.force_login(user)
    return c.cookies[settings.SESSION_COOKIE_NAME].value


class Communicator(WebsocketCommunicator):  # type: ignore[misc]
    """A test's websocket; its disconnect waits TIMEOUT for the consumer to end, not
    the library's 1 s, which a loaded machine passes while the consumer leaves its
    groups on redis."""

    async def disconnect(self, code: int = 1000, timeout: float = TIMEOUT) -> None:
        await super().disconnect(code=code, timeout=timeout)


def communicator(path: str, cookie: str | None = None,
                 origin: bytes | None = b"http://127.0.0.1:8000") -> Communicator:
    headers = [(b"host", b"127.0.0.1:8000")]
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    comm = Communicator(application, path, headers=headers)
    comm.scope["client"] = ("127.0.0.1", 50000)
    return comm


async def connect(path: str, cookie: str | None) -> tuple[WebsocketCommunicator, dict[str, Any]]:
    """An accepted websocket and its first message (its state)."""
    comm = communicator(path, cookie)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    first = await comm.receive_json_from(timeout=TIMEOUT)
    assert first["type"] in ("state", "vserver"), first
    return comm, first


async def closed_with(comm: WebsocketCommunicator, *, connect: bool = True) -> tuple[int, str]:
    """(code, reason) of the panel's refusal: its `closing` word, then the close."""
    if connect:
        connected, _ = await comm.connect(timeout=TIMEOUT)
        assert connected, "accepted first, so that the page is told why"
    while True:
        out = await comm.receive_output(timeout=TIMEOUT)
        if out["type"] == "websocket.send":
            word = json.loads(out["text"])
            if word["type"] == "closing":
                break
            continue  # an event sent before the refusal
        raise AssertionError(f"closed without a word: {out}")
    out = await comm.receive_output(timeout=TIMEOUT)
    assert out == {"type": "websocket.close", "code": word["code"],
                   "reason": word["reason"][:120]}, out
    await comm.disconnect()
    return word["code"], word["reason"]


async def messages_until(comm: WebsocketCommunicator, done: Callable[[dict[str, Any]], bool],
                         timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Messages up to and including the first DONE says yes to."""
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        assert left > 0, f"not seen within {timeout} s; got {got}"
        msg = await comm.receive_json_from(timeout=left)
        got.append(msg)
        if done(msg):
            return got


async def no_message(comm: WebsocketCommunicator, wait: float = 0.3) -> None:
    assert await comm.receive_nothing(timeout=wait), await comm.receive_output()


def sync(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Sync Django code from a test's loop, as a view runs under Daphne."""
    return database_sync_to_async(fn)  # type: ignore[no-any-return]


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]
