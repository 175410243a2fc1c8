"""Console sessions: login shells inside guests, served to browser terminals.

The panel's browser terminal (xterm.js) talks to the panel, which bridges it
to a websocket here (GET /1.0/consoles/ID with an upgrade). A session is a
login shell on a terminal of the guest's own devpts, made as `vserver NAME
enter` makes one (guest.open_console); the agent keeps the terminal's master
and relays it in its event loop, so a session costs no thread, only a
descriptor pair and a helper process that waits for the shell.

A session outlives its client: after a page reload or a dropped connection
the shell goes on for its idle time (IDLE_SECONDS, or less if the request
asked), and the next client to attach is first sent the last RING_BYTES of
output, so that its terminal shows the screen again. One client at a time:
a second attach takes the session over and the first is closed with
CONSOLE_CLOSE_TAKEN_OVER. The session ends when the shell exits, its idle
time runs out, it is closed (DELETE), its guest stops or the agent stops;
then the shell and every process left in its session are killed, and every
descriptor is closed.

The loop never waits for a client. Output waits in a queue of at most
QUEUE_BYTES per client; while that is full the terminal is not read, so the
shell waits as it would on a slow terminal (nothing is lost). A client that
takes nothing for STALL_SECONDS has fallen behind and is closed with
CONSOLE_CLOSE_FELL_BEHIND; the session goes on and may be attached again.
Input is written without blocking; while the shell does not read it, more
than INPUT_BYTES of it make the agent stop reading the client's websocket.

Input bytes go to the terminal exactly as they come: the terminal and the
shell on it are the guest's, and nothing a client sends reaches a command
line of the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable

from aiohttp import WSMsgType, web

from hostagent import context, guest, wire
from hostagent.api import ApiError

__all__ = ["IDLE_SECONDS", "Consoles", "Session"]

_LOG = logging.getLogger(__name__)

IDLE_SECONDS = wire.CONSOLE_IDLE_MAX  # 300: how long a session outlives its last client
RING_BYTES = 64 << 10  # output kept for the next client to attach
QUEUE_BYTES = 1 << 20  # output queued for one client; past this the terminal is not read
STALL_SECONDS = 10.0  # a client that takes nothing for this long has fallen behind
INPUT_BYTES = 64 << 10  # input the shell has not read yet, before its client must wait
MAX_PER_GUEST = 8
MAX_TOTAL = 64
READ_BYTES = 64 << 10  # one read of the terminal
FRAME_BYTES = 256 << 10  # queued output sent as one websocket frame, at most
END_WAIT = 10.0  # seconds a killed shell is waited for before its helper is left to itself
CLOSE_WAIT = 2.0  # seconds a websocket close may take before the connection is cut

# The close frame's reason for each ending (wire.CONSOLE_ENDINGS).
_ENDINGS_SAID = {
    "exited": "the shell exited",
    "closed": "the console was closed",
    "idle": "the console was left unattached for its idle time",
    "guest-stopped": "the vserver stopped",
    "agent-stopping": "the agent is stopping",
}

Opener = Callable[[str, str | None, int, int], guest.Console]
Publish = Callable[..., None]  # (action, guest, **metadata): a lifecycle event


class _Client:
    """One attached websocket: its output queue and the task that sends it."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self.items: collections.deque[bytes | str] = collections.deque()
        self.queued = 0  # bytes of terminal output in ITEMS
        self.wake = asyncio.Event()
        self.closing: tuple[int, str] | None = None  # close with this once ITEMS are sent
        self.gone = False  # detached: sends nothing more

    def push(self, item: bytes | str) -> None:
        if self.gone or self.closing is not None:
            return
        self.items.append(item)
        if isinstance(item, bytes):
            self.queued += len(item)
        self.wake.set()

    def finish(self, code: int, reason: str) -> None:
        """Close the websocket once what is queued has been sent."""
        if self.closing is None:
            self.closing = (code, reason)
        self.wake.set()

    def drop(self, code: int, reason: str) -> None:
        """Close the websocket now; what is queued is not sent."""
        self.gone = True
        self.items.clear()
        self.queued = 0
        self.closing = (code, reason)
        self.wake.set()

    def _next(self) -> bytes | str:
        """The next frame: a text message, or queued output joined up to FRAME_BYTES."""
        item = self.items.popleft()
        if isinstance(item, str):
            return item
        parts = [item]
        size = len(item)
        while self.items and size < FRAME_BYTES:
            nxt = self.items[0]
            if not isinstance(nxt, bytes):
                break
            self.items.popleft()
            parts.append(nxt)
            size += len(nxt)
        return b"".join(parts)

    async def send(self, session: Session) -> None:
        """Send what is queued until told to close (and all is sent) or the peer fails."""
        try:
            while not self.gone:
                if not self.items:
                    if self.closing is not None:
                        break
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                frame = self._next()
                try:
                    if isinstance(frame, str):
                        await asyncio.wait_for(self.ws.send_str(frame), STALL_SECONDS)
                    else:
                        await asyncio.wait_for(self.ws.send_bytes(frame), STALL_SECONDS)
                except TimeoutError:
                    # Its socket buffer has stayed full: the peer took nothing.
                    session.client_left(self)
                    self.drop(wire.CONSOLE_CLOSE_FELL_BEHIND,
                              f"fell behind: took no output for {STALL_SECONDS:g} s; attach again")
                    break
                if isinstance(frame, bytes) and not self.gone:
                    self.queued -= len(frame)
                    session.output_taken(self)
        except (ConnectionError, RuntimeError):  # the peer went away
            self.gone = True
            session.client_left(self)

    async def close(self) -> None:
        """Close with the code and reason asked for; cut a peer that does not take the close.

        Never while a receive() is pending: aiohttp then drops the connection
        right after its close frame, and the peer's reply fails, which makes
        its client report 1006 instead of our code.
        """
        code, reason = self.closing or (1000, "")
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]),
                                   CLOSE_WAIT)
        except (TimeoutError, ConnectionError, RuntimeError):
            if self.request.transport is not None:
                self.request.transport.abort()


class Session:
    """One console: its shell, the output kept for the next client, the client attached."""

    def __init__(self, loop: asyncio.AbstractEventLoop, console: guest.Console, idle: float,
                 on_end: Callable[[Session, int | None, str], None]) -> None:
        self.id = str(uuid.uuid4())
        self.guest = console.guest
        self.created = time.time()
        self.console = console
        self.idle = idle
        self.ring = bytearray()
        self.client: _Client | None = None
        self.code: int | None = None  # the shell's exit status, once the session has ended
        self.reason = ""  # why it ended (wire.CONSOLE_ENDINGS)
        self._loop = loop
        self._on_end = on_end
        self._end_task: asyncio.Task[None] | None = None
        self._reading = False
        self._pending = bytearray()  # input the terminal did not take yet
        self._input_room = asyncio.Event()
        self._input_room.set()
        self._shell_ended = asyncio.Event()
        self._abandoned = False  # ended without its helper's exit: reap it when it comes
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def ending(self) -> bool:
        return self._end_task is not None

    def info(self) -> wire.ConsoleInfo:
        return wire.ConsoleInfo(id=self.id, guest=self.guest, created=round(self.created, 3),
                                attached=self.client is not None)

    def start(self) -> None:
        self._loop.add_reader(self.console.waiter_fd, self._on_shell_exit)
        self._resume()
        self._arm_idle()

    # --- output ---

    def _resume(self) -> None:
        if not self._reading and not self.ending and self.console.master_fd >= 0:
            self._loop.add_reader(self.console.master_fd, self._on_output)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.console.master_fd)
            self._reading = False

    def _on_output(self) -> None:
        try:
            data = os.read(self.console.master_fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:  # EIO: no process holds the terminal any more
            data = b""
        if not data:
            # The shell's end comes through its helper; nothing more to read.
            self._pause()
            return
        self._keep(data)
        if self.client is not None and self.client.queued >= QUEUE_BYTES:
            self._pause()  # the shell waits for the client, as on a slow terminal

    def _keep(self, data: bytes) -> None:
        self.ring += data
        excess = len(self.ring) - RING_BYTES
        if excess > 0:
            # Start the replay at a line if one begins soon after the cut.
            nl = self.ring.find(b"\n", excess, excess + 4096)
            del self.ring[:excess if nl < 0 else nl + 1]
        if self.client is not None:
            self.client.push(data)

    def _drain(self) -> None:
        """Take what the shell wrote before it ended (bounded: its jobs may still write)."""
        if self.console.master_fd < 0:
            return
        for _ in range(RING_BYTES // READ_BYTES * 4):
            try:
                data = os.read(self.console.master_fd, READ_BYTES)
            except OSError:  # EAGAIN: nothing more now; EIO: nobody holds the terminal
                return
            if not data:
                return
            self._keep(data)

    def output_taken(self, client: _Client) -> None:
        if client is self.client and client.queued < QUEUE_BYTES // 2:
            self._resume()

    # --- input ---

    async def write(self, data: bytes) -> None:
        """Give DATA to the terminal; wait only while too much of it is not taken."""
        if self.ending or not data:
            return
        if not self._pending:
            try:
                n = os.write(self.console.master_fd, data)
            except BlockingIOError:
                n = 0
            except OSError:  # EIO: the terminal's other side is gone
                return
            if n == len(data):
                return
            self._loop.add_writer(self.console.master_fd, self._flush)
            data = data[n:]
        self._pending += data
        while len(self._pending) > INPUT_BYTES and not self.ending:
            self._input_room.clear()
            await self._input_room.wait()

    def _flush(self) -> None:
        try:
            n = os.write(self.console.master_fd, self._pending)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._pending)
        del self._pending[:n]
        if not self._pending:
            self._loop.remove_writer(self.console.master_fd)
        if len(self._pending) <= INPUT_BYTES:
            self._input_room.set()

    def _control(self, client: _Client, text: str) -> None:
        try:
            msg = wire.ConsoleResize.from_json(wire.decode_json(text.encode()))
        except wire.WireError as e:
            client.push(json.dumps(wire.ConsoleError(error=e.message, field=e.field).to_json()))
            return
        if not self.ending:
            with contextlib.suppress(OSError):
                self.console.resize(msg.cols, msg.rows)

    # --- clients ---

    async def attach(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """Serve WS as this session's client until it leaves or the session ends."""
        client = _Client(ws, request)
        if self.ending:
            await self.end(self.reason)
            client.push(json.dumps(wire.ConsoleExit(self.code, self.reason).to_json()))
            client.finish(1000, "the console has ended")
            await client.send(self)
            await client.close()
            return
        old, self.client = self.client, client
        if old is not None:
            old.drop(wire.CONSOLE_CLOSE_TAKEN_OVER, "another client attached to this console")
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.ring:
            client.push(bytes(self.ring))
        self._resume()
        sender = self._loop.create_task(client.send(self))
        receiver = self._loop.create_task(self._receive(client))
        try:
            # Until the client leaves (receiver), or we are done with it (sender:
            # the session ended, another client took over, or it fell behind).
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, sender):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._detach(client)
            await client.close()

    async def _receive(self, client: _Client) -> None:
        async for msg in client.ws:
            if msg.type == WSMsgType.BINARY:
                await self.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                self._control(client, msg.data)

    def _detach(self, client: _Client) -> None:
        if self.client is client:
            self.client = None
            self._resume()
            self._arm_idle()

    def client_left(self, client: _Client) -> None:
        self._detach(client)

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.ending and self.client is None:
            self._idle_timer = self._loop.call_later(self.idle, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        self.end_soon("idle")

    # --- the end ---

    def _on_shell_exit(self) -> None:
        self._loop.remove_reader(self.console.waiter_fd)
        self._shell_ended.set()
        if self._abandoned:
            self.console.close()  # the helper has exited: this reaps it and closes the rest
        else:
            self.end_soon("exited")

    def end_soon(self, reason: str) -> asyncio.Task[None]:
        """End the session for REASON (wire.CONSOLE_ENDINGS), unless it is ending already.

        One task per session, held here (the loop keeps only a weak reference),
        and never cancelled by whoever waits for it.
        """
        if self._end_task is None:
            self.reason = reason
            self._end_task = self._loop.create_task(self._end(reason))
        return self._end_task

    async def end(self, reason: str) -> None:
        """End the session (see end_soon) and wait until it has ended."""
        await asyncio.shield(self.end_soon(reason))

    async def _end(self, reason: str) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._pause()
        if self._pending:
            self._loop.remove_writer(self.console.master_fd)
            self._pending.clear()
        self._input_room.set()
        if reason != "exited":
            await self._loop.run_in_executor(None, self.console.kill)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shell_ended.wait(), END_WAIT)
        self._drain()
        self.code = self.console.poll()
        if self.code is None:
            # A shell still not gone END_WAIT after SIGKILL (an uninterruptible
            # sleep): let the terminal go now and reap the helper when it exits.
            _LOG.warning("console %s in %s: the shell did not end after SIGKILL", self.id,
                         self.guest)
            self._abandoned = True
            self.console.close_master()
        else:
            # The shell's jobs, if it ended by itself, and every descriptor.
            await self._loop.run_in_executor(None, self.console.kill)
            self.console.close()
        client, self.client = self.client, None
        if client is not None:
            client.push(json.dumps(wire.ConsoleExit(self.code, reason).to_json()))
            client.finish(1001 if reason == "agent-stopping" else 1000, _ENDINGS_SAID[reason])
        self._on_end(self, self.code, reason)


class Consoles:
    """Every console session of the agent, by id; lives in the event loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, opener: Opener,
                 publish: Publish) -> None:
        self._loop = loop
        self._opener = opener
        self._publish = publish
        self._sessions: dict[str, Session] = {}
        self._opening: collections.Counter[str] = collections.Counter()

    def all(self) -> list[wire.ConsoleInfo]:
        return [s.info() for s in self._sessions.values()]

    def get(self, console_id: str) -> Session:
        s = self._sessions.get(console_id)
        if s is None:
            raise ApiError(404, f"no console {console_id[:64]!r}", "id")
        return s

    async def open(self, name: str, req: wire.ConsoleRequest) -> wire.ConsoleInfo:
        per_guest = sum(1 for s in self._sessions.values() if s.guest == name)
        if per_guest + self._opening[name] >= MAX_PER_GUEST:
            raise ApiError(409, f"{name} has {MAX_PER_GUEST} consoles open, the most one "
                           "vserver may have; close one first", "name")
        if len(self._sessions) + self._opening.total() >= MAX_TOTAL:
            raise ApiError(409, f"the agent has {MAX_TOTAL} consoles open, the most it "
                           "serves; close one first")
        self._opening[name] += 1
        try:
            fut = self._loop.run_in_executor(None, self._opener, name, req.user, req.cols,
                                             req.rows)
            try:
                console = await asyncio.shield(fut)
            except asyncio.CancelledError:
                fut.add_done_callback(self._close_orphan)
                raise
        except guest.GuestError as e:
            cause = e.__cause__
            if isinstance(cause, context.LaunchError) and cause.step == "user":
                raise ApiError(400, str(e), "user") from e
            raise ApiError(409, str(e), "name") from e
        finally:
            self._opening[name] -= 1
        s = Session(self._loop, console, req.idle or IDLE_SECONDS, self._ended)
        self._sessions[s.id] = s
        s.start()
        self._publish(wire.EVENT_CONSOLE_OPENED, name, console=s.id)
        return s.info()

    def _close_orphan(self, fut: asyncio.Future[guest.Console]) -> None:
        """A console opened for a request that went away meanwhile: end it."""
        if not fut.cancelled() and fut.exception() is None:
            self._loop.run_in_executor(None, fut.result().close)

    def _ended(self, s: Session, code: int | None, reason: str) -> None:
        self._sessions.pop(s.id, None)
        self._publish(wire.EVENT_CONSOLE_CLOSED, s.guest, console=s.id, code=code,
                      reason=reason)

    async def close(self, console_id: str) -> wire.ConsoleExit:
        s = self.get(console_id)
        await s.end("closed")
        return wire.ConsoleExit(s.code, "closed")

    def end_guest(self, name: str, reason: str = "guest-stopped") -> None:
        """End NAME's sessions (its guest is stopping or has ended)."""
        for s in list(self._sessions.values()):
            if s.guest == name:
                s.end_soon(reason)

    async def close_all(self) -> None:
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.end("agent-stopping") for s in sessions))
