"""Websocket consumers of the live pages: the dashboard and a vserver's page.

    ws/vservers/        DashboardConsumer: every vserver the user may see
    ws/vservers/ID/     VServerConsumer: one vserver, and its processes on request

(and on LiveConsumer, panel/classroom/consumers.py's ws/classes/SLUG/: a teacher's grid).

Who: the session (AuthMiddlewareStack's cookie), read afresh from the session
store, so a session that has ended, owes its second factor (django-otp) or
whose user was deactivated is refused; the Origin must be one of
ALLOWED_HOSTS (AllowedHostsOriginValidator in panel/asgi.py, before any of
this). Every refusal is a `{"type": "closing", "code": ..., "reason": ...}`
message, then a close with that 4xxx code, so that the page can say why and
knows not to reconnect:

    4401  not logged in (no session, logged out, second step owed)
    4404  no such vserver: missing, or another tenant's (the same answer)
    4410  the vserver was deleted
    4400  a message the panel does not understand
    4429  too many messages

Access is checked again on every message from the page, on every event before
it is forwarded, every RECHECK seconds, and at once when the user logs out
(Django's user_logged_out, sent to the group `user-ID`) or their memberships
or account change (panel/guests/signals.py). A vserver page whose user loses
access to it is closed (4404); a dashboard stops showing what its user may no
longer see (a `deleted` message for each).

To the browser (every vserver as events.snapshot makes it; on a vserver's
page as events.detail does, with its recent operations):

    {"type": "state", "vservers": [...],          dashboard: all, on connect, and
     "plans": [...]}                               its customers' usage bars
    {"type": "vserver", "vserver": {...}, "ts": T} one vserver changed (and, on a
                                                   vserver page, on connect)
    {"type": "deleted", "vserver": {"id": ID}}    gone (or no longer visible)
    {"type": "plan", "plan": {"customer": ID,     dashboard: a customer's usage
     "bars": [...] | null}}                        bars changed (null: not shown)
    {"type": "processes", "running": bool|null, "rows": [...], "total": N,
     "usage": {...}, "error": str|null, "ts": T}  vserver page, while watched:
                                                   processes and usage
    {"type": "closing", "code": C, "reason": R}   before a close

From the browser (vserver page): `{"type": "watch-processes"}`,
`{"type": "unwatch-processes"}`, `{"type": "ping"}` (answered `pong`).

The state a page loaded, plus the messages it received, equals a fresh
fetch (events.state_for and events.plans_for / events.detail): each
forwarded vserver, and its customer's bars, is read again after the change
it announces (once per change and process, shared by every page watching),
never taken from a message that may be older.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib import auth
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.models import Device

from panel.guests import events
from panel.guests.models import VServer
from panel.guests.plan_usage import plan_of
from panel.guests.processes import WATCHER
from panel.guests.processes import group as procs_group
from panel.guests.processes import to_page as procs_to_page
from panel.hosting.choices import SCOPED_ROLES
from panel.hosting.middleware import second_step
from panel.hosting.models import Customer, Membership

__all__ = [
    "CLOSE_BAD",
    "CLOSE_DELETED",
    "CLOSE_FLOOD",
    "CLOSE_LOGIN",
    "CLOSE_MISSING",
    "DashboardConsumer",
    "LiveConsumer",
    "VServerConsumer",
    "count_audience",
    "may_see",
    "session_user",
    "snapshot_after",
    "user_group",
]

CLOSE_BAD = 4400
CLOSE_LOGIN = 4401
CLOSE_MISSING = 4404
CLOSE_DELETED = 4410
CLOSE_FLOOD = 4429

# Seconds between two checks of the session and access with nothing else happening.
RECHECK = float(getattr(settings, "VPANEL_WS_RECHECK", 30.0))

_LOG = logging.getLogger(__name__)
# A page sends a few messages a minute; this many within WINDOW seconds is not a page.
FLOOD, WINDOW = 30, 10.0


def user_group(user_id: int) -> str:
    """The group of every websocket of one user: logouts and access changes go there."""
    return f"user-{user_id}"


def session_user(session_key: str | None) -> Any | None:
    """The user of session SESSION_KEY as a page request would see it; None if refused.

    Read afresh from the session store (not the copy the connection started
    with), so a logout, a password change or a deactivation shows; and a
    session whose user has a TOTP device but has not given a code (or staff
    without one under VPANEL_STAFF_2FA) is refused, as every page is.
    """
    if not session_key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    request = SimpleNamespace(session=store, META={})
    user = auth.get_user(request)  # type: ignore[arg-type]
    if not user.is_authenticated or not user.is_active:
        return None
    # What django-otp's OTPMiddleware would say of this session.
    device = None
    persistent_id = store.get(DEVICE_ID_SESSION_KEY)
    if persistent_id:
        device = Device.from_persistent_id(persistent_id)
        if device is not None and (device.user_id != user.pk or not device.confirmed):
            device = None
    user.otp_device = device
    user.is_verified = lambda: user.otp_device is not None
    request.user = user
    if second_step(request) is not None:  # type: ignore[arg-type]
        return None
    return user


def _exists(vs_id: int) -> bool:
    return VServer.objects.filter(pk=vs_id).exists()


def _read_snapshot(vs_id: int) -> dict[str, Any] | None:
    vs = VServer.objects.filter(pk=vs_id).first()
    return None if vs is None else events.snapshot(vs)


def _read_detail(vs_id: int) -> dict[str, Any] | None:
    vs = VServer.objects.filter(pk=vs_id).first()
    return None if vs is None else events.detail(vs)


def _read_plan(customer_id: int) -> dict[str, Any] | None:
    customer = Customer.objects.filter(pk=customer_id).select_related("plan").first()
    return None if customer is None else plan_of(customer)


def _members_among(customer_id: int, user_ids: Iterable[int]) -> frozenset[int]:
    """Those of USER_IDS who are members of CUSTOMER_ID now, in whichever role."""
    return frozenset(Membership.objects.filter(customer_id=customer_id, user_id__in=list(
        user_ids)).values_list("user_id", flat=True))


def _viewers_among(customer_id: int, vs_id: int, user_ids: Iterable[int]) -> frozenset[int]:
    """Those of USER_IDS who may see vserver VS_ID of CUSTOMER_ID now: VServer.visible_to's
    rule (staff aside), for many users in a few queries. A member sees the customer's
    vservers, except in a scoped role (panel/classroom): a student only their own seat's,
    a TA those of the seats of their groups."""
    members = _members_among(customer_id, user_ids)
    if not members:
        return members
    scoped = frozenset(Membership.objects.filter(
        customer_id=customer_id, user_id__in=list(members), role__in=SCOPED_ROLES)
        .values_list("user_id", flat=True))
    if not scoped:
        return members
    own = VServer.objects.filter(pk=vs_id, seat__user_id__in=list(scoped)).values_list(
        "seat__user_id", flat=True)
    assisting = Membership.objects.filter(
        user_id__in=list(scoped), ta_groups__group__seats__vserver_id=vs_id).values_list(
        "user_id", flat=True)
    return (members - scoped) | frozenset(own) | frozenset(assisting)


# Work done once per event and process, however many pages it goes to: the
# event's id (`eid`) and what is asked -> a future of the answer.
_ONCE: collections.OrderedDict[str, asyncio.Future[Any]] = collections.OrderedDict()
_ONCE_KEPT = 4096


async def _once(key: str, work: Callable[[], Awaitable[Any]]) -> Any:
    loop = asyncio.get_running_loop()
    fut = _ONCE.get(key)
    if fut is not None and fut.get_loop() is loop:
        return await asyncio.shield(fut)
    fut = loop.create_future()
    _ONCE[key] = fut
    while len(_ONCE) > _ONCE_KEPT:
        _ONCE.popitem(last=False)
    try:
        result = await work()
    except BaseException as e:
        _ONCE.pop(key, None)
        fut.set_exception(e)
        fut.exception()  # retrieved: whoever awaits it gets it, nobody else is warned
        raise
    fut.set_result(result)
    return result


async def snapshot_after(event: dict[str, Any]) -> dict[str, Any] | None:
    """The vserver as the database has it after the change EVENT announces (None: deleted):
    read once per change and process."""
    vs_id = int(event["vserver"]["id"])
    read = functools.partial(database_sync_to_async(_read_snapshot), vs_id)
    if not event.get("eid"):
        return await read()  # type: ignore[no-any-return]
    return await _once(f"snap:{event['eid']}:{vs_id}", read)  # type: ignore[no-any-return]


async def _detail_after(event: dict[str, Any]) -> dict[str, Any] | None:
    """What a vserver page shows after the change EVENT announces: the snapshot (the
    dashboards' read) and the recent operations, each read once per change and process."""
    snap = await snapshot_after(event)
    if snap is None:
        return None
    vs_id = int(event["vserver"]["id"])
    read = functools.partial(database_sync_to_async(events.recent_operations), vs_id)
    recent = await (_once(f"recent:{event['eid']}:{vs_id}", read) if event.get("eid")
                    else read())
    return {**snap, "recent": recent}


async def _plan_after(customer_id: int, eid: str | None) -> dict[str, Any] | None:
    """CUSTOMER_ID's usage bars after the change EID announces: read once per change."""
    read = functools.partial(database_sync_to_async(_read_plan), customer_id)
    if not eid:
        return await read()  # type: ignore[no-any-return]
    return await _once(f"plan:{eid}:{customer_id}", read)  # type: ignore[no-any-return]


# The users (not staff) with a live page of each customer's vservers in this
# process: customer id -> user id -> pages. An event is checked against the
# memberships of all of them in one query, not one per page.
_AUDIENCE: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def count_audience(customer_id: int, user_id: int, delta: int) -> None:
    pages = _AUDIENCE[customer_id]
    pages[user_id] += delta
    if pages[user_id] <= 0:
        del pages[user_id]
    if not pages:
        del _AUDIENCE[customer_id]


async def _is_member(user: Any, customer_id: int, eid: str | None) -> bool:
    """Whether USER is a member of CUSTOMER_ID now: for an event (EID), asked once for
    every user with a page of that customer in this process."""
    if eid and user.pk in _AUDIENCE.get(customer_id, ()):
        async def ask() -> tuple[frozenset[int], frozenset[int]]:
            asked = frozenset(_AUDIENCE.get(customer_id, ()))
            return asked, await database_sync_to_async(_members_among)(customer_id, asked)

        asked, members = await _once(f"members:{eid}:{customer_id}", ask)
        if user.pk in asked:  # else its page came after the question: asked on its own
            return user.pk in members
    return user.pk in await database_sync_to_async(_members_among)(customer_id, [user.pk])


async def may_see(user: Any, customer_id: int, vs_id: int, eid: str | None) -> bool:
    """Whether USER (not staff) may see vserver VS_ID of CUSTOMER_ID now: for an event
    (EID), asked once for every user with a page of that customer in this process."""
    if eid and user.pk in _AUDIENCE.get(customer_id, ()):
        async def ask() -> tuple[frozenset[int], frozenset[int]]:
            asked = frozenset(_AUDIENCE.get(customer_id, ()))
            return asked, await database_sync_to_async(_viewers_among)(customer_id, vs_id,
                                                                       asked)

        asked, viewers = await _once(f"viewers:{eid}:{customer_id}:{vs_id}", ask)
        if user.pk in asked:  # else its page came after the question: asked on its own
            return user.pk in viewers
    return user.pk in await database_sync_to_async(_viewers_among)(customer_id, vs_id,
                                                                   [user.pk])


class LiveConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """What both consumers share: who, the refusals, the rechecks, the groups."""

    user: Any = None
    session_key: str | None = None
    closing = False

    # --- connecting ---

    async def connect(self) -> None:
        # Accepted first, so that a refusal can say why (a refused handshake
        # reaches the page as a bare 1006).
        await self.accept()
        events.attach_loop(asyncio.get_running_loop())
        self.joined: set[str] = set()
        self.recent: collections.deque[float] = collections.deque(maxlen=FLOOD)
        self.recheck: asyncio.Task[None] | None = None
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None)
        self.user = await database_sync_to_async(session_user)(self.session_key)
        if self.user is None:
            await self.refuse(CLOSE_LOGIN, "log in first")
            return
        await self.join(user_group(self.user.pk))
        if await self.begin():
            self.recheck = asyncio.get_running_loop().create_task(self._recheck_every())

    async def begin(self) -> bool:
        """The consumer's own start: access, groups, the state to send; False if refused."""
        raise NotImplementedError

    async def allowed(self) -> bool:
        """Whether the user may still have this page (closing it, with the reason, if not)."""
        raise NotImplementedError

    # --- the groups and the end ---

    async def join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.joined.add(group)

    async def leave(self, group: str) -> None:
        self.joined.discard(group)
        await self.channel_layer.group_discard(group, self.channel_name)

    async def refuse(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        await self.send_json({"type": "closing", "code": code, "reason": reason})
        await self.close(code=code, reason=reason[:120])

    def count_in(self, customers: set[int]) -> None:
        """Count this page in _AUDIENCE for exactly CUSTOMERS (the empty set: for none)."""
        counted: set[int] = getattr(self, "audience", set())
        for c in counted - customers:
            count_audience(c, self.user.pk, -1)
        for c in customers - counted:
            count_audience(c, self.user.pk, +1)
        self.audience = set(customers)

    async def disconnect(self, code: int) -> None:
        self.count_in(set())
        self.closing = True
        if self.recheck is not None and self.recheck is not asyncio.current_task():
            self.recheck.cancel()
        for g in list(getattr(self, "joined", ())):
            await self.leave(g)

    async def send_json(self, content: Any, close: bool = False) -> None:
        if self.closing and content.get("type") != "closing":
            return  # nothing after the word that it closes
        await super().send_json(content, close)

    # --- checking again ---

    async def still_allowed(self) -> bool:
        """The session as it is now, then access; closing the page with the reason if not."""
        if self.closing:
            return False
        user = await database_sync_to_async(session_user)(self.session_key)
        if user is None or user.pk != self.user.pk:
            await self.refuse(CLOSE_LOGIN, "the session has ended: log in again")
            return False
        self.user = user  # its staff flag as it is now
        return await self.allowed()

    async def _recheck_every(self) -> None:
        while not self.closing:
            await asyncio.sleep(RECHECK)
            try:
                await self.still_allowed()
            except Exception:  # a database hiccup: the next pass, or the next event, tries again
                _LOG.exception("rechecking a live page of user %s", self.user.pk)

    async def session_ended(self, event: dict[str, Any]) -> None:
        """user-ID: one of the user's sessions logged out; ours, if it is this one."""
        if event.get("session") == self.session_key:
            await self.refuse(CLOSE_LOGIN, "logged out")

    async def access_changed(self, event: dict[str, Any]) -> None:
        """user-ID: the user's memberships or account changed."""
        await self.still_allowed()

    # --- from the page ---

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None,
                      **kwargs: Any) -> None:
        if self.closing or self.user is None:
            return
        now = time.monotonic()
        self.recent.append(now)
        if len(self.recent) == FLOOD and now - self.recent[0] < WINDOW:
            await self.refuse(CLOSE_FLOOD, "too many messages")
            return
        try:
            content = await self.decode_json(text_data or "")
        except ValueError:
            content = None
        if not isinstance(content, dict) or not isinstance(content.get("type"), str):
            await self.refuse(CLOSE_BAD, 'expected JSON: {"type": ...}')
            return
        if not await self.still_allowed():
            return
        kind = content["type"]
        if kind == "ping":
            await self.send_json({"type": "pong"})
        elif not await self.command(kind, content):
            await self.send_json({"type": "error", "error": f"unknown message type {kind[:40]!r}"})

    async def command(self, kind: str, content: dict[str, Any]) -> bool:
        """A message of the page's that this consumer knows; False if it does not."""
        return False


class DashboardConsumer(LiveConsumer):
    """Every vserver the user may see: staff join `staff`, others each `customer-ID`;
    and the usage bars of the customers the user is a member of (their sections)."""

    async def begin(self) -> bool:
        self.known: set[int] = set()
        self.plans: dict[int, dict[str, Any]] = {}  # the bars it was last sent, by customer
        await self._join_groups()
        state = await database_sync_to_async(events.state_for)(self.user)
        self.plans = await database_sync_to_async(events.plans_for)(self.user)
        self.known = set(state)
        await self.send_json({"type": "state", "vservers": list(state.values()),
                              "plans": list(self.plans.values())})
        return True

    async def _join_groups(self) -> None:
        wanted = await database_sync_to_async(self._groups)()
        for g in [g for g in self.joined if g.startswith(("customer-", "staff"))]:
            if g not in wanted:
                await self.leave(g)
        for g in wanted - self.joined:
            await self.join(g)
        self.count_in({int(g.split("-", 1)[1]) for g in wanted if g.startswith("customer-")})

    def _groups(self) -> set[str]:
        if self.user.is_staff:
            return {"staff"}
        return {f"customer-{c}" for c in
                Membership.objects.filter(user=self.user).values_list("customer_id", flat=True)}

    async def allowed(self) -> bool:
        """A dashboard stays open, with no vservers at worst: its groups and what it shows
        follow the user's memberships."""
        await self._join_groups()
        state = await database_sync_to_async(
            lambda: set(VServer.objects.visible_to(self.user).values_list("pk", flat=True)))()
        for vs_id in sorted(self.known - state):
            await self._gone(vs_id)
        for vs_id in sorted(state - self.known):
            snap = await database_sync_to_async(_read_snapshot)(vs_id)
            if snap is not None:
                self.known.add(vs_id)
                await self.send_json({"type": "vserver", "vserver": snap, "ts": time.time()})
        # The bars: those of a customer the user left go, a joined one's come, and a
        # change no vserver event told of (the plan itself, staff's overrides) shows.
        plans = await database_sync_to_async(events.plans_for)(self.user)
        for c in sorted(set(self.plans) - set(plans)):
            del self.plans[c]
            await self.send_json({"type": "plan", "plan": {"customer": c, "bars": None}})
        for c, plan in sorted(plans.items()):
            await self._send_plan(c, plan)
        return True

    async def _plan_changed(self, customer_id: Any, eid: str | None) -> None:
        """After a change of a vserver of CUSTOMER_ID: its bars, if this page shows them."""
        if customer_id is None or int(customer_id) not in self.plans:
            return
        plan = await _plan_after(int(customer_id), eid)
        if plan is not None:
            await self._send_plan(int(customer_id), plan)

    async def _send_plan(self, customer_id: int, plan: dict[str, Any]) -> None:
        if self.plans.get(customer_id) != plan:
            self.plans[customer_id] = plan
            await self.send_json({"type": "plan", "plan": plan})

    async def _gone(self, vs_id: int, ts: float | None = None) -> None:
        if vs_id in self.known:
            self.known.discard(vs_id)
            await self.send_json({"type": "deleted", "vserver": {"id": vs_id}, "ts": ts})

    async def vserver_changed(self, event: dict[str, Any]) -> None:
        if self.closing:
            return
        vs_id, customer = int(event["vserver"]["id"]), event["vserver"].get("customer")
        if not self.user.is_staff and (customer is None or not await may_see(
                self.user, int(customer), vs_id, event.get("eid"))):
            await self._gone(vs_id, event.get("ts"))  # no longer theirs
            return
        snap = await snapshot_after(event)
        if snap is None:
            await self._gone(vs_id, event.get("ts"))
        else:
            self.known.add(vs_id)
            await self.send_json({"type": "vserver", "vserver": snap, "ts": event.get("ts")})
        await self._plan_changed(customer, event.get("eid"))

    async def vserver_deleted(self, event: dict[str, Any]) -> None:
        # Only a vserver this page was shown: telling that it is gone reveals nothing.
        if self.closing:
            return
        await self._gone(int(event["vserver"]["id"]), event.get("ts"))
        # Its customer's bars, if the page shows them and the user is still a member.
        customer = event["vserver"].get("customer")
        if customer is not None and (self.user.is_staff or await _is_member(
                self.user, int(customer), event.get("eid"))):
            await self._plan_changed(customer, event.get("eid"))

    async def processes_rows(self, event: dict[str, Any]) -> None:
        return  # the vserver pages' (a dashboard never joins procs-ID)


class VServerConsumer(LiveConsumer):
    """One vserver (`vserver-ID`), and while asked its process list (`procs-ID`)."""

    watching = False

    async def begin(self) -> bool:
        self.vs_id = int(self.scope["url_route"]["kwargs"]["pk"])
        where = await database_sync_to_async(self._where)()
        if where is None:
            await self.refuse(CLOSE_MISSING, "no such vserver")
            return False
        self.agent_socket, self.vs_name, self.customer_id = where
        if not self.user.is_staff:
            self.count_in({self.customer_id})
        await self.join(f"vserver-{self.vs_id}")
        snap = await database_sync_to_async(_read_detail)(self.vs_id)
        if snap is None:
            await self.refuse(CLOSE_DELETED, "deleted")
            return False
        await self.send_json({"type": "vserver", "vserver": snap, "ts": time.time()})
        return True

    def _where(self) -> tuple[str, str, int] | None:
        """(its agent's socket, its name, its customer), if the user may see it."""
        vs = (VServer.objects.visible_to(self.user).filter(pk=self.vs_id)
              .select_related("host").first())
        return None if vs is None else (vs.host.agent_socket, vs.name, vs.customer_id)

    async def allowed(self, eid: str | None = None) -> bool:
        """Staff see every vserver (their flag is read again every RECHECK s and on a
        change of their account); others while they may (may_see: members of its
        customer, a TA of its student's group, the student of its seat)."""
        if self.user.is_staff or await may_see(self.user, self.customer_id, self.vs_id, eid):
            return True
        # Gone from the database (this page was shown it: no secret), or no longer theirs.
        if not await database_sync_to_async(_exists)(self.vs_id):
            await self.vserver_deleted({})
        else:
            await self.refuse(CLOSE_MISSING, "no such vserver")
        return False

    async def disconnect(self, code: int) -> None:
        await self._unwatch()
        await super().disconnect(code)

    # --- the page's requests ---

    async def command(self, kind: str, content: dict[str, Any]) -> bool:
        if kind == "watch-processes":
            if not self.watching:
                self.watching = True
                await self.join(procs_group(self.vs_id))
                last = await WATCHER.watch(self.vs_id, self.agent_socket, self.vs_name)
                if last is not None:
                    await self._send_rows(last)
            return True
        if kind == "unwatch-processes":
            await self._unwatch()
            return True
        return False

    async def _unwatch(self) -> None:
        if self.watching:
            self.watching = False
            await self.leave(procs_group(self.vs_id))
            await WATCHER.unwatch(self.vs_id)

    # --- events ---

    async def vserver_changed(self, event: dict[str, Any]) -> None:
        if self.closing or not await self.allowed(event.get("eid")):
            return
        snap = await _detail_after(event)
        if snap is None:
            await self.vserver_deleted(event)
            return
        await self.send_json({"type": "vserver", "vserver": snap, "ts": event.get("ts")})

    async def vserver_deleted(self, event: dict[str, Any]) -> None:
        if self.closing:
            return
        await self.send_json({"type": "deleted", "vserver": {"id": self.vs_id},
                              "ts": event.get("ts")})
        await self.refuse(CLOSE_DELETED, "deleted")

    async def processes_rows(self, event: dict[str, Any]) -> None:
        # This process's stream only: with channels-redis the group spans processes.
        if not self.watching or self.closing or event.get("source") != WATCHER.token:
            return
        if not await self.allowed(event.get("eid")):
            return
        await self._send_rows(event)

    async def _send_rows(self, event: dict[str, Any]) -> None:
        await self.send_json(procs_to_page(event))
