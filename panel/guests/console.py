"""The browser console: a terminal on a shell inside a vserver, over a websocket.

`ws/vservers/<pk>/console/?cols=C&rows=R` (panel/guests/routing.py). The page
(static/js/console.js, xterm.js) sends what is typed or pasted as binary
frames and its size as a text frame {"type": "resize", "cols", "rows"}; it
gets the terminal's output as binary frames and, as text frames,
{"type": "exit", "code", "reason"} when the shell ends and {"type":
"closing", "code", "reason", "retry"?} just before the panel closes the
connection, so that the page can say why (browsers are not given a close
frame's reason by every server: Daphne drops it); "retry" asks the page to
attach again by itself. The same convention as the live pages' consumers.

The consumer relays to a console session of the host's agent
(docs/agent-api.md, "Consoles"): it opens one with
POST /1.0/guests/NAME/console and attaches to it on the agent's websocket
GET /1.0/consoles/ID. The session's id is kept in the user's Django session,
per vserver: a reload or a dropped connection attaches again to the same
shell for as long as the agent keeps it (a few minutes after the last
detach), and the agent replays the recent output. Logging out deletes the
Django session, and the consumer ends that shell on the agent at once.

Who may: the gate is `VServer.objects.visible_to(user)` (another tenant's
vserver closes with 4404, exactly like a missing one); then any role of the
vserver's customer, and staff, unless the vserver has the 'private' flag or
the customer's plan does not offer the console (4403, audited as denied), or
it does not run (4409). Each connection is audited ('open-console', with the
client's address). The same checks run again, on a fresh read of the Django
session (consumers.session_user, shared with the live pages) and of the
database, before a message from the browser is passed on (at most once in
CHECK_MIN seconds: a keystroke is a message), every CHECK_EVERY seconds while
only output flows, and at once when the user logs out or their memberships
change (the group `user-ID`, panel/guests/signals.py).
A console whose user may no longer have it is closed and its shell ended on
the agent, not left for the agent's idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs

import httpx
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.sessions.backends.base import UpdateError

from hostagent import wire
from hostagent.client import AgentClient, AgentError, attach_console
from panel.guests.actions import Actor, audit, role
from panel.guests.availability import Availability
from panel.guests.choices import VServerStatusChoices
from panel.guests.consumers import session_user, user_group
from panel.guests.models import VServer
from panel.hosting.choices import AuditResultChoices

__all__ = [
    "CLOSE_AGENT",
    "CLOSE_EXITED",
    "CLOSE_FELL_BEHIND",
    "CLOSE_LOGIN",
    "CLOSE_MISSING",
    "CLOSE_NOT_RUNNING",
    "CLOSE_REFUSED",
    "CLOSE_TAKEN_OVER",
    "ConsoleConsumer",
    "Refusal",
    "console_availability",
    "console_refusal",
]

_LOG = logging.getLogger(__name__)

# Close codes (4000-4999 are the application's, RFC 6455 section 7.4.2), after
# the HTTP statuses they resemble, so that the page can tell them apart.
CLOSE_EXITED = 1000  # the shell ended; the page offers a new one
CLOSE_LOGIN = 4401  # no session, or it ended (logout, password change, second factor owed)
CLOSE_REFUSED = 4403  # the plan, the 'private' flag: the reason says which
CLOSE_MISSING = 4404  # no such vserver, or another tenant's
CLOSE_NOT_RUNNING = 4409  # a console needs a running vserver
CLOSE_AGENT = 4502  # the host's agent does not answer, or ended the session
# The agent's own, passed on (hostagent.wire): the session goes on without this page.
CLOSE_TAKEN_OVER = wire.CONSOLE_CLOSE_TAKEN_OVER  # 4001: another page attached to it
CLOSE_FELL_BEHIND = wire.CONSOLE_CLOSE_FELL_BEHIND  # 4002: the page attaches again by itself

# Why a session ended (wire.CONSOLE_ENDINGS), as the page says it.
_ENDINGS = {
    "exited": "the shell ended",
    "closed": "the console was closed",
    "idle": "the console was left unused too long and was closed",
    "guest-stopped": "the vserver stopped",
    "agent-stopping": "the host's agent is stopping",
}

AUDIT_ACTION = "open-console"
SESSION_CONSOLES = "vpanel_consoles"  # Django session key: {str(pk): {"id", "host", "guest"}}
CHECK_EVERY = 15.0  # seconds between checks while nothing comes from the browser
# Seconds within which a message from the browser is passed on without checking again:
# one keystroke is one message, and the checks (a few queries) all run on the one
# thread Channels gives database work, shared by every websocket of the process.
# A logout or a lost membership closes the console at once anyway (the user's group).
CHECK_MIN = 1.0
DEFAULT_SIZE = (80, 24)


@dataclass(frozen=True)
class Refusal:
    code: int
    reason: str
    audited: bool = False  # a refusal of a visible vserver: audit row with result 'denied'


# --- the rules -----------------------------------------------------------------------------

def console_refusal(vs: VServer, user: Any, *, running: bool = True) -> Refusal | None:
    """Why USER may not have a console on VS now, or None (VS: with customer__plan).

    RUNNING False leaves out the one rule that is not about who: an open
    console's shell ends with its vserver, and the agent says so (exit).
    """
    if role(user, vs.customer) is None:
        # Not reached through visible_to, which lets only members and staff through;
        # kept so that this function alone is the whole rule.
        return Refusal(CLOSE_MISSING, "no such vserver")
    if "private" in (vs.flags or []):
        return Refusal(CLOSE_REFUSED, f"{vs.name} has the 'private' flag: nobody may enter "
                                      "it, not from the panel either", audited=True)
    if not vs.customer.limits().console_allowed:
        return Refusal(CLOSE_REFUSED, f"the plan of {vs.customer} does not include the "
                                      "console", audited=True)
    if running and vs.status != VServerStatusChoices.STATUS_RUNNING:
        return Refusal(CLOSE_NOT_RUNNING, f"{vs.name} is {vs.get_status_display().lower()}: "
                                          "the console needs it running")
    return None


def console_availability(vs: VServer, user: Any) -> Availability:
    """The console for the vserver page's button: enabled, or disabled with the reason."""
    refusal = console_refusal(vs, user)
    return Availability(True) if refusal is None else Availability(False, refusal.reason)


def _source_ip(scope: dict[str, Any]) -> str | None:
    client = scope.get("client") or ()
    try:
        return str(ipaddress.ip_address(client[0])) if client else None
    except ValueError:
        return None


def _size(query_string: bytes) -> tuple[int, int]:
    """cols and rows from the connection's query string, within bounds (80x24 if absent)."""
    q = parse_qs(query_string.decode("latin-1"))
    try:
        cols, rows = int(q["cols"][0]), int(q["rows"][0])
    except (KeyError, ValueError):
        return DEFAULT_SIZE
    top = wire.CONSOLE_SIZE_MAX
    return max(1, min(cols, top)), max(1, min(rows, top))


# --- the Django session's console ids --------------------------------------------------------

def _stored_console(session_key: str, vs: VServer) -> str | None:
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    entry = (store.get(SESSION_CONSOLES) or {}).get(str(vs.pk))
    # Only for the same guest on the same host: a vserver moved or renamed has another shell.
    if entry and entry.get("host") == vs.host_id and entry.get("guest") == vs.name:
        return str(entry["id"])
    return None


def _store_console(session_key: str, vs: VServer, console_id: str | None) -> None:
    """Keep (or with None forget) VS's console id in the session, read fresh and saved at once.

    A fresh store rather than the websocket's copy from connect: saving that copy
    would write back whatever the session held then over later changes.
    """
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if store.get(SESSION_KEY) is None:
        return  # logged out meanwhile: saving would bring the session back to life
    consoles = dict(store.get(SESSION_CONSOLES) or {})
    if console_id is None:
        if consoles.pop(str(vs.pk), None) is None:
            return
    else:
        consoles[str(vs.pk)] = {"id": console_id, "host": vs.host_id, "guest": vs.name}
    store[SESSION_CONSOLES] = consoles
    with contextlib.suppress(UpdateError):  # deleted between the read and the save
        store.save()


# --- the agent -------------------------------------------------------------------------------

class AgentUnavailable(Exception):
    """The host's agent did not answer, or refused: the message says what happened."""


def _agent_call(socket_path: str, call: Callable[[AgentClient], Any]) -> Any:
    """CALL on a client of the agent at SOCKET_PATH, as AgentUnavailable if it fails."""
    try:
        with AgentClient(socket_path, timeout=30) as c:
            return call(c)
    except AgentError as e:
        raise AgentUnavailable(f"the host's agent refused the console: {e.error}") from e
    except (httpx.HTTPError, OSError) as e:
        raise AgentUnavailable("the host's agent does not answer") from e


class _AgentConsole:
    """The agent's side of one browser connection: open, attach, detach, close."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.ws: Any = None  # aiohttp's ClientWebSocketResponse, while attached
        self._stack = contextlib.AsyncExitStack()

    async def open(self, guest: str, cols: int, rows: int) -> str:
        info = await sync_to_async(_agent_call, thread_sensitive=False)(
            self.socket_path, lambda c: c.console_open(guest, cols, rows))
        return str(info.id)

    async def attach(self, console_id: str) -> bool:
        """Attach to CONSOLE_ID; False if the agent no longer has it (ended, timed out)."""
        try:
            self.ws = await self._stack.enter_async_context(
                attach_console(self.socket_path, console_id))
        except AgentError as e:
            if e.status == 404:
                return False
            raise AgentUnavailable(f"the host's agent refused the console: {e.error}") from e
        except Exception as e:  # aiohttp's ClientError, OSError: nothing listens there
            raise AgentUnavailable("the host's agent does not answer") from e
        return True

    async def detach(self) -> None:
        """Leave the session, which lives on for a re-attach within the agent's idle time."""
        self.ws = None
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    async def end(self, console_id: str) -> None:
        """End the session on the agent: its shell and what it left running are killed."""
        await self.detach()
        with contextlib.suppress(AgentUnavailable):
            await sync_to_async(_agent_call, thread_sensitive=False)(
                self.socket_path, lambda c: c.console_close(console_id))


# --- the consumer ----------------------------------------------------------------------------

class ConsoleConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    agent: _AgentConsole | None = None
    console_id: str | None = None
    relay: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    closed = False
    checked = 0.0  # the event loop's time of the last check that let the user through

    async def connect(self) -> None:
        # Accepted first, always: a websocket refused during its handshake reaches the
        # page as a bare 1006, with no code or reason to show.
        await self.accept()
        self.pk = int(self.scope["url_route"]["kwargs"]["pk"])
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        gate = await self._gate(connecting=True)
        if isinstance(gate, Refusal):
            await self._close_with(gate.code, gate.reason)
            return
        vs, user = gate
        self.vs, self.user_id = vs, user.pk
        # A logout or a change of memberships is told to this group at once
        # (panel/guests/signals.py): session_ended and access_changed below.
        self.group = user_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        cols, rows = _size(self.scope.get("query_string", b""))
        try:
            reattached = await self._attach(vs, cols, rows)
        except AgentUnavailable as e:
            await self._audit(vs, user, AuditResultChoices.RESULT_ERROR, error=str(e))
            await self._close_with(CLOSE_AGENT, str(e))
            return
        await self._audit(vs, user, AuditResultChoices.RESULT_OK, console=self.console_id,
                          reattached=reattached)
        self.relay = asyncio.create_task(self._relay())
        self.watch = asyncio.create_task(self._watch())

    async def _attach(self, vs: VServer, cols: int, rows: int) -> bool:
        """Attach to this session's shell on VS if the agent still has it (True), else to
        a new one (False)."""
        assert self.session_key is not None  # noqa: S101 (the gate let no session-less one in)
        self.agent = _AgentConsole(vs.host.agent_socket)
        stored = await database_sync_to_async(_stored_console)(self.session_key, vs)
        if stored is not None and await self.agent.attach(stored):
            self.console_id = stored
            # The shell keeps the size of the page that last had it: give it this one's.
            await self.agent.ws.send_json(wire.ConsoleResize(cols=cols, rows=rows).to_json())
            return True
        console_id = await self.agent.open(vs.name, cols, rows)
        if not await self.agent.attach(console_id):
            raise AgentUnavailable("the host's agent lost the console it had just opened")
        self.console_id = console_id
        await database_sync_to_async(_store_console)(self.session_key, vs, console_id)
        return False

    async def receive(self, text_data: str | None = None,
                      bytes_data: bytes | None = None) -> None:
        if self.closed or self.agent is None or self.agent.ws is None:
            return
        if asyncio.get_running_loop().time() - self.checked >= CHECK_MIN:
            gate = await self._gate()
            if isinstance(gate, Refusal):
                await self._refuse(gate)
                return
        try:
            if bytes_data:
                await self.agent.ws.send_bytes(bytes_data)
            elif text_data:
                await self._control(text_data)
        except (ConnectionError, RuntimeError):
            pass  # the agent's side is gone: the relay notices and closes

    async def _control(self, text: str) -> None:
        """A JSON message of the page: only resize is known; anything else is ignored."""
        try:
            resize = wire.ConsoleResize.from_json(json.loads(text))
        except (ValueError, wire.WireError):
            return
        await self.agent.ws.send_json(resize.to_json())  # type: ignore[union-attr]

    async def _relay(self) -> None:
        """The agent's side to the page, until either ends; then the page is told why."""
        import aiohttp

        ws = self.agent.ws  # type: ignore[union-attr]
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await self.send(bytes_data=msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await self._agent_says(msg.data)
                    if self.closed:
                        return
                else:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # the relay must always end in a close the page can explain
            _LOG.exception("console relay of vserver %s", self.pk)
        if ws.close_code == wire.CONSOLE_CLOSE_TAKEN_OVER:
            await self._close_with(CLOSE_TAKEN_OVER, "this console was opened in another "
                                   "window, which has it now")
        elif ws.close_code == wire.CONSOLE_CLOSE_FELL_BEHIND:
            # The shell goes on; the page attaches again by itself.
            await self._close_with(CLOSE_FELL_BEHIND, "this page fell behind the "
                                   "terminal's output", retry=True)
        else:
            await self._close_with(CLOSE_AGENT, "the host's agent ended the console")

    async def _agent_says(self, text: str) -> None:
        """A text frame of the agent: the session's end, or a refused control message."""
        try:
            data = json.loads(text)
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "exit":
                ended = wire.ConsoleExit.from_json(data)
            elif kind == "error":
                _LOG.info("console of vserver %s: the agent refused %s",
                          self.pk, wire.ConsoleError.from_json(data))
                return
            else:
                return
        except (ValueError, wire.WireError):
            return
        await database_sync_to_async(_store_console)(self.session_key, self.vs, None)
        await self.send(text_data=json.dumps({"type": "exit", "code": ended.code,
                                              "reason": ended.reason}))
        await self._close_with(CLOSE_EXITED, _ENDINGS.get(ended.reason, "the console ended"))

    async def _watch(self) -> None:
        """The checks of every message, also while only output flows (`top`, a long build)."""
        while not self.closed:
            await asyncio.sleep(CHECK_EVERY)
            gate = await self._gate()
            if isinstance(gate, Refusal):
                await self._refuse(gate)
                return

    async def _gate(self, *, connecting: bool = False) -> tuple[VServer, Any] | Refusal:
        """The rules, on a fresh read of the session and the database: (vserver, user) or why not.

        CONNECTING: the status rule too, and a refusal of a visible vserver is audited.
        """
        gate = await database_sync_to_async(self._check)(connecting)
        if not isinstance(gate, Refusal):
            self.checked = asyncio.get_running_loop().time()
        return gate

    def _check(self, connecting: bool) -> tuple[VServer, Any] | Refusal:
        user = session_user(self.session_key)
        if user is None or user.pk != getattr(self, "user_id", user.pk):
            return Refusal(CLOSE_LOGIN, "log in to use the console (this session has ended)")
        vs = (VServer.objects.visible_to(user).select_related("customer__plan", "host")
              .filter(pk=self.pk).first())
        if vs is None:
            return Refusal(CLOSE_MISSING, "no such vserver")
        refusal = console_refusal(vs, user, running=connecting)
        if refusal is not None and refusal.audited and connecting:
            audit(Actor(user, _source_ip(self.scope)), vs.customer, vs, AUDIT_ACTION,
                  result=AuditResultChoices.RESULT_DENIED, reason=refusal.reason)
        return refusal or (vs, user)

    @database_sync_to_async
    def _audit(self, vs: VServer, user: Any, result: str, **detail: Any) -> None:
        audit(Actor(user, _source_ip(self.scope)), vs.customer, vs, AUDIT_ACTION, result=result,
              **detail)

    async def session_ended(self, event: dict[str, Any]) -> None:
        """user-ID: one of the user's sessions logged out; ours, if it is this one."""
        if event.get("session") == self.session_key:
            await self._refuse(Refusal(CLOSE_LOGIN, "logged out"))

    async def access_changed(self, event: dict[str, Any]) -> None:
        """user-ID: the user's memberships or account changed: the checks, now."""
        if self.closed or self.agent is None:
            return
        gate = await self._gate()
        if isinstance(gate, Refusal):
            await self._refuse(gate)

    async def _refuse(self, refusal: Refusal) -> None:
        """An open console whose user may no longer have it: close it, and end its shell.

        The shell is ended on the agent, not only left: nobody who may not have it
        should find it still running (a logout in another tab, a member removed).
        """
        if self.closed:
            return
        await self._close_with(refusal.code, refusal.reason)
        if self.agent is not None and self.console_id is not None:
            await self.agent.end(self.console_id)
            if refusal.code != CLOSE_LOGIN:  # a logout has deleted the session already
                await database_sync_to_async(_store_console)(self.session_key, self.vs, None)

    async def _close_with(self, code: int, reason: str, *, retry: bool = False) -> None:
        """Tell the page why, then close, and leave the agent's session; once."""
        if self.closed:
            return
        self.closed = True
        word: dict[str, Any] = {"type": "closing", "code": code, "reason": reason}
        if retry:
            word["retry"] = True
        with contextlib.suppress(Exception):
            await self.send(text_data=json.dumps(word))
        await self.close(code=code, reason=reason[:120])
        await self._detach()

    async def _detach(self) -> None:
        """Stop our tasks and leave the agent's session (it lives on for a re-attach)."""
        current = asyncio.current_task()
        for task in (self.relay, self.watch):
            if task is not None and task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.agent is not None:
            await self.agent.detach()

    async def disconnect(self, code: int) -> None:
        self.closed = True
        await self._detach()
        group = getattr(self, "group", None)
        if group is not None:
            await self.channel_layer.group_discard(group, self.channel_name)
