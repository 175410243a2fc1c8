"""Console sessions through a real `hostagent serve`: a login shell in a busybox guest,
on a terminal of the guest's own, driven over the agent's websocket as the panel does."""

from __future__ import annotations

import asyncio
import json
import os
import select
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from hostagent import consoles, guest, wire
from hostagent.client import AgentClient, AgentError, attach_console
from hostagent.paths import Paths
from tests.agent.test_agent_api import EventLog
from tests.helpers import AgentProcess

GUEST = "box"


@pytest.fixture
def agent(vroots: Paths) -> Iterator[AgentProcess]:
    proc = AgentProcess(vroots).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[AgentClient]:
    with AgentClient(agent.socket) as c:
        yield c


def build(client: AgentClient, name: str, *, start: bool = True, **kw: object) -> None:
    req = wire.BuildRequest.from_json({"name": name, "method": "busybox", **kw})
    client.run(client.build(req))
    if start:
        client.run(client.state(name, "start"))


@pytest.fixture
def box(client: AgentClient) -> str:
    """A running busybox guest, started through the agent (so it watches it)."""
    build(client, GUEST, hostname="box.example")
    return GUEST


class Term:
    """One attached websocket, as a terminal: what came back, and the control messages."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.out = bytearray()
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    async def type(self, text: str | bytes) -> None:
        await self.ws.send_bytes(text.encode() if isinstance(text, str) else text)

    async def _receive(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; the terminal shows:\n{self.screen()}")
        msg = await asyncio.wait_for(self.ws.receive(), left)
        if msg.type == aiohttp.WSMsgType.BINARY:
            self.out += msg.data
        elif msg.type == aiohttp.WSMsgType.TEXT:
            self.messages.append(json.loads(msg.data))
        else:
            self.closed = True

    async def expect(self, needle: str, timeout: float = 15, since: int = 0) -> None:
        """Wait until NEEDLE has come back from the terminal (after byte SINCE)."""
        deadline = time.monotonic() + timeout
        want = needle.encode()
        while (found := self.out.find(want, since)) < 0:
            since = max(since, len(self.out) - len(want))  # look at new bytes only
            if self.closed:
                raise AssertionError(f"closed before {needle!r}:\n{self.screen()}")
            await self._receive(deadline)
        del found

    async def run(self, command: str, timeout: float = 15) -> str:
        """Type COMMAND and return what it printed (between two markers the shell computes)."""
        n = len(self.out)
        await self.type(f"echo B$((1+1))B; {command}; echo E$((2+2))E\r")
        await self.expect("E4E", timeout, since=n)
        text = self.out[n:].decode(errors="replace")
        return text[text.index("B2B") + 3:text.index("E4E")].strip()

    async def message(self, kind: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if m.get("type") == kind:
                    return m
            if self.closed:
                raise AssertionError(f"closed without a {kind!r} message: {self.messages}")
            await self._receive(deadline)

    async def until_closed(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            await self._receive(deadline)

    def screen(self) -> str:
        return self.out[-2000:].decode(errors="replace")


@asynccontextmanager
async def attached(agent: AgentProcess, console_id: str) -> AsyncIterator[Term]:
    async with attach_console(agent.socket, console_id) as ws:
        yield Term(ws)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def wait_until(what: Callable[[], bool], timeout: float = 15, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting: {why}"
        time.sleep(0.05)


def console_ids(client: AgentClient) -> set[str]:
    return {c.id for c in client.consoles()}


def shells(client: AgentClient, name: str, marker: str = "sh -l") -> list[wire.ProcessRow]:
    return [p for p in client.processes(name) if marker in p.command]


# --- the wire ------------------------------------------------------------------------------

def test_console_messages_round_trip_and_refuse_bad_fields() -> None:
    for msg in (wire.ConsoleRequest(), wire.ConsoleRequest(132, 50, "www-data", 1.5),
                wire.ConsoleInfo("0b97-ab", "web", 1795936819.41, True),
                wire.ConsoleResize(80, 24), wire.ConsoleExit(None, "idle"),
                wire.ConsoleExit(137, "closed"), wire.ConsoleError("bad", "cols")):
        body = json.dumps(msg.to_json()).encode()
        assert type(msg).from_json(wire.decode_json(body)) == msg
    assert wire.ConsoleRequest.from_json({}) == wire.ConsoleRequest(80, 24, None, None)
    for bad, field in (({"cols": 1001}, "cols"), ({"rows": 0}, "rows"), ({"cols": 1.5}, "cols"),
                       ({"idle": 0}, "idle"), ({"idle": 300.5}, "idle"),
                       ({"user": "root\n"}, "user"), ({"argv": ["sh"]}, "argv")):
        with pytest.raises(wire.WireError) as e:
            wire.ConsoleRequest.from_json(bad)
        assert e.value.field == field
    with pytest.raises(wire.WireError):
        wire.ConsoleResize.from_json({"type": "exec", "cols": 1, "rows": 1})
    for action in (wire.EVENT_CONSOLE_OPENED, wire.EVENT_CONSOLE_CLOSED):
        assert action in wire.LIFECYCLE_EVENTS
        ev = {"type": "lifecycle", "timestamp": 1.0, "guest": "web", "action": action}
        assert wire.Event.from_json(ev).action == action
    assert consoles.IDLE_SECONDS == 300


# --- guest.open_console, without the agent ----------------------------------------------------

def test_open_console_gives_a_terminal_of_the_guest_to_the_caller(
        vroots: Paths, busybox_guest: str) -> None:
    with pytest.raises(guest.GuestError, match="not running"):
        guest.open_console(vroots, busybox_guest)
    guest.start(vroots, busybox_guest, output=lambda _b: None)
    con = guest.open_console(vroots, busybox_guest, cols=90, rows=20)
    out = bytearray()

    def until(needle: bytes) -> None:
        deadline = time.monotonic() + 15
        while needle not in out:
            assert time.monotonic() < deadline, out.decode(errors="replace")
            if select.select([con.master_fd], [], [], 0.2)[0]:
                out.extend(os.read(con.master_fd, 65536))

    try:
        assert os.get_blocking(con.master_fd) is False
        os.write(con.master_fd, b"stty size; echo s-$((2*3))\r")
        until(b"s-6")
        assert b"20 90" in out
        con.resize(100, 40)
        os.write(con.master_fd, b"stty size; echo t-$((2*4))\r")
        until(b"t-8")
        assert b"40 100" in out
        assert con.poll() is None
        os.write(con.master_fd, b"exit 5\r")
        deadline = time.monotonic() + 15
        while select.select([con.waiter_fd], [], [], 0.2)[0] == []:
            assert time.monotonic() < deadline
        assert con.poll() == 5
    finally:
        assert con.close() in (5, 137)
    assert (con.master_fd, con.pidfd, con.waiter_fd) == (-1, -1, -1)


# --- a shell inside the guest -------------------------------------------------------------

def test_console_is_a_login_shell_inside_the_guest_on_its_own_terminal(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    log = EventLog(agent.socket)
    info = client.console_open(box, cols=100, rows=30)
    assert (info.guest, info.attached) == (box, False)
    assert client.console(info.id) == info
    assert [c.id for c in client.consoles()] == [info.id]

    async def session() -> None:
        async with attached(agent, info.id) as term:
            await term.type("echo hello-$((6*7))\r")
            await term.expect("hello-42")
            assert client.console(info.id).attached
            assert await term.run("hostname") == "box.example"
            # The guest's own PID 1 (the small init), not the host's.
            assert await term.run("tr '\\0' ' ' < /proc/1/cmdline") == "init -P"
            assert await term.run("readlink /proc/$$/ns/pid") == \
                await term.run("readlink /proc/1/ns/pid")
            # A terminal of the guest's own devpts instance, never a host tty.
            assert await term.run("tty") == "/dev/pts/0"
            assert await term.run("echo $TERM; id -u") == "xterm-256color\r\n0"

    run(session())
    # Seen from the host, the shell is one of the guest's processes.
    assert len(shells(client, box)) == 1
    ended = client.console_close(info.id)
    assert (ended.code, ended.reason) == (137, "closed")
    assert console_ids(client) == set()
    assert shells(client, box) == []
    log.wait_for(box, wire.EVENT_CONSOLE_CLOSED)
    events = [e for e in log.events if e.action.startswith("console-")]
    assert [(e.action, e.metadata["console"]) for e in events] == [
        (wire.EVENT_CONSOLE_OPENED, info.id), (wire.EVENT_CONSOLE_CLOSED, info.id)]
    assert events[0].metadata["state"] == wire.STATE_RUNNING
    assert (events[1].metadata["code"], events[1].metadata["reason"]) == (137, "closed")


def test_input_reaches_the_terminal_byte_for_byte(agent: AgentProcess, client: AgentClient,
                                                 box: str) -> None:
    info = client.console_open(box)

    async def session() -> None:
        async with attached(agent, info.id) as term:
            # ^C is a byte for the terminal: its line discipline makes it SIGINT.
            await term.type("sleep 300; echo after-$((5*5))\r")
            await asyncio.sleep(0.5)
            await term.type(b"\x03")
            await term.type("echo back-$((7*7))\r")
            await term.expect("back-49")
            assert b"after-25" not in term.out
            # A host shell's metacharacters are nobody's business here: they reach the
            # guest's shell as typed, and the host never sees them.
            assert await term.run("printf '%s|' \"$(echo '$(id)' ';' '`x`')\"") == \
                "$(id) ; `x`|"

    run(session())
    client.console_close(info.id)


def test_resize_changes_the_size_the_shell_sees(agent: AgentProcess, client: AgentClient,
                                               box: str) -> None:
    info = client.console_open(box, cols=100, rows=30)

    async def session() -> None:
        async with attached(agent, info.id) as term:
            assert await term.run("stty size") == "30 100"
            await term.ws.send_json(wire.ConsoleResize(cols=132, rows=50).to_json())
            assert await term.run("stty size") == "50 132"
            # A refused control message is answered; the session goes on.
            await term.ws.send_json({"type": "resize", "cols": 0, "rows": 50})
            err = await term.message("error")
            assert err["field"] == "cols"
            await term.ws.send_str("not json")
            assert await term.run("stty size") == "50 132"

    run(session())
    client.console_close(info.id)


# --- clients come and go; the session stays ------------------------------------------------

def test_detach_and_reattach_find_the_same_shell_and_its_screen(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    info = client.console_open(box)

    async def first() -> str:
        async with attached(agent, info.id) as term:
            await term.type("KEPT=kept-$((40+2)); echo marker-$((3*3))\r")
            await term.expect("marker-9")
            return await term.run("echo $$")

    async def second() -> tuple[str, bytes, str]:
        async with attached(agent, info.id) as term:
            await term.expect("marker-9")  # the replay of what it showed before
            replay = bytes(term.out)
            return await term.run("echo $$"), replay, await term.run("echo $KEPT")

    pid = run(first())
    wait_until(lambda: not client.console(info.id).attached, why="detached")
    time.sleep(0.5)
    assert client.console(info.id).id == info.id  # still there
    pid2, replay, kept = run(second())
    assert (pid2, kept) == (pid, "kept-42")
    assert b"echo marker-" in replay
    client.console_close(info.id)


def test_a_second_client_takes_the_session_over(agent: AgentProcess, client: AgentClient,
                                               box: str) -> None:
    info = client.console_open(box)

    async def session() -> None:
        async with attached(agent, info.id) as one:
            await one.type("echo one-$((1*1))\r")
            await one.expect("one-1")
            async with attached(agent, info.id) as two:
                await one.until_closed()
                assert one.ws.close_code == wire.CONSOLE_CLOSE_TAKEN_OVER
                assert await two.run("echo two") == "two"

    run(session())
    client.console_close(info.id)


def test_shell_exit_ends_the_session_with_its_code(agent: AgentProcess, client: AgentClient,
                                                  box: str) -> None:
    log = EventLog(agent.socket)
    info = client.console_open(box)

    async def session() -> dict[str, Any]:
        async with attached(agent, info.id) as term:
            await term.run("true")
            await term.type("sleep 1000 & exit 3\r")
            end = await term.message("exit")
            await term.until_closed()
            assert term.ws.close_code == 1000
            return end

    assert run(session()) == {"type": "exit", "code": 3, "reason": "exited"}
    assert console_ids(client) == set()
    with pytest.raises(AgentError) as e:
        client.console(info.id)
    assert e.value.status == 404
    # The job it left in its session went with it.
    wait_until(lambda: shells(client, box, "sleep 1000") == [], why="the job killed")
    log.wait_for(box, wire.EVENT_CONSOLE_CLOSED)
    closed = [e for e in log.events if e.action == wire.EVENT_CONSOLE_CLOSED]
    assert closed[0].metadata["code"] == 3


def test_closing_kills_the_shell_and_its_jobs_but_not_what_left_its_session(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    info = client.console_open(box)

    async def session() -> None:
        async with attached(agent, info.id) as term:
            await term.run("sleep 1001 & sleep 1002 & true")
            await term.run("setsid sleep 1003 < /dev/null > /dev/null 2>&1 & true")
            await asyncio.sleep(0.3)

    run(session())
    assert len(shells(client, box, "sleep 100")) == 3
    client.console_close(info.id)
    assert [p.command for p in shells(client, box, "sleep 100")] == ["sleep 1003"]


def test_an_unattached_session_ends_after_its_idle_time(agent: AgentProcess,
                                                       client: AgentClient, box: str) -> None:
    never = client.console_open(box, idle=1)
    left = client.console_open(box, idle=1.5)

    async def visit() -> None:
        async with attached(agent, left.id) as term:
            await term.run("true")
            await asyncio.sleep(2)  # attached: no idle time runs

    run(visit())
    assert never.id not in console_ids(client)
    assert left.id in console_ids(client)
    wait_until(lambda: left.id not in console_ids(client), timeout=10, why="idle end")
    assert shells(client, box) == []


def test_stopping_the_guest_ends_its_sessions_at_once(agent: AgentProcess,
                                                     client: AgentClient, box: str) -> None:
    info = client.console_open(box)

    async def session() -> dict[str, Any]:
        async with attached(agent, info.id) as term:
            await term.run("true")
            started = time.monotonic()
            op = await asyncio.to_thread(client.state, box, "stop")
            end = await term.message("exit")
            await term.until_closed()
            await asyncio.to_thread(client.run, op)
            # The shell ignores the stop's TERM: had it been left to the stop,
            # the stop would have waited for its grace time.
            assert time.monotonic() - started < 10
            return end

    assert run(session())["reason"] == "guest-stopped"
    assert console_ids(client) == set()


# --- refusals and limits ---------------------------------------------------------------------

def test_console_is_refused_for_private_stopped_and_missing_guests(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    build(client, "secret", flags=["private"])
    build(client, "idle", start=False)
    for name, status, words in (("secret", 409, "private"), ("idle", 409, "not running"),
                                ("nosuch", 404, "no vserver")):
        with pytest.raises(AgentError) as e:
            client.console_open(name)
        assert e.value.status == status and words in e.value.error, e.value
    with pytest.raises(AgentError) as e:
        client.console_open(box, user="nobody-here")
    assert (e.value.status, e.value.field) == (400, "user")
    for body, field in (({"cols": 0}, "cols"), ({"rows": 1001}, "rows"), ({"idle": 301}, "idle"),
                        ({"user": "a;b"}, "user"), ({"shell": "/bin/sh"}, "shell")):
        with pytest.raises(AgentError) as e:
            client.request("POST", f"/guests/{box}/console", body)
        assert (e.value.status, e.value.field) == (400, field)
    with pytest.raises(AgentError) as e:
        run(attached(agent, "0" * 32).__aenter__())
    assert e.value.status == 404
    assert console_ids(client) == set()
    assert shells(client, box) == [] and shells(client, "secret") == []


def test_a_guest_has_at_most_a_few_consoles(agent: AgentProcess, client: AgentClient,
                                           box: str) -> None:
    opened = [client.console_open(box) for _ in range(consoles.MAX_PER_GUEST)]
    with pytest.raises(AgentError) as e:
        client.console_open(box)
    assert e.value.status == 409 and "close one" in e.value.error
    client.console_close(opened[0].id)
    client.console_close(client.console_open(box).id)
    for info in opened[1:]:
        client.console_close(info.id)
    assert shells(client, box) == []


def test_open_and_close_leave_no_descriptor_or_process_behind(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    assert agent.proc is not None

    def children() -> list[int]:
        pids = []
        for tid in os.listdir(f"/proc/{agent.proc.pid}/task"):
            with open(f"/proc/{agent.proc.pid}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return sorted(pids)

    async def touch(console_id: str) -> None:
        async with attached(agent, console_id) as term:
            await term.run("true")

    client.console_close(client.console_open(box).id)  # the first one warms things up
    fds, kids = agent.fds(), children()
    for i in range(20):
        info = client.console_open(box)
        if i % 4 == 0:
            run(touch(info.id))
        client.console_close(info.id)
    wait_until(lambda: agent.fds() <= fds, timeout=5, why=f"fds {agent.fds()} > {fds}")
    assert children() == kids
    assert shells(client, box) == []
    # While a console is open, the helper that waits for its shell (the agent's
    # child) holds none of the agent's descriptors: not its sockets, not the terminal.
    info = client.console_open(box)
    (helper,) = set(children()) - set(kids)
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{helper}/fd")) == [0, 1, 2]
    client.console_close(info.id)


def test_an_agent_that_stops_ends_its_consoles_and_leaves_the_guest_running(
        agent: AgentProcess, client: AgentClient, box: str, vroots: Paths) -> None:
    info = client.console_open(box)

    async def session() -> dict[str, Any]:
        async with attached(agent, info.id) as term:
            await term.run("true")
            stopping = asyncio.ensure_future(asyncio.to_thread(agent.stop))
            end = await term.message("exit")
            await term.until_closed()
            await stopping
            assert term.ws.close_code == 1001
            return end

    assert run(session()) == {"type": "exit", "code": 137, "reason": "agent-stopping"}
    assert guest.running(vroots, box)
    out = bytearray()
    code = guest.exec_in(vroots, box, ["/bin/sh", "-c", "ps -o args"], output=out.extend)
    assert code == 0 and b"sh -l" not in out, out


@pytest.mark.slow
def test_a_client_that_reads_nothing_is_dropped_without_stalling_the_agent(
        agent: AgentProcess, client: AgentClient, box: str) -> None:
    info = client.console_open(box)

    async def session() -> None:
        async with attached(agent, info.id) as slow:
            await slow.run("true")
            # Far more than every buffer on the way holds, and never read.
            await slow.type("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 8000000; "
                            "echo done-$((8*8))\r")
            await asyncio.sleep(2)
            started = time.monotonic()
            await asyncio.to_thread(client.host)
            assert time.monotonic() - started < 1
            deadline = time.monotonic() + consoles.STALL_SECONDS + 15
            while (await asyncio.to_thread(client.console, info.id)).attached:
                assert time.monotonic() < deadline, "the slow client was never dropped"
                await asyncio.sleep(0.5)
        # The session went on without it, and takes a new client.
        async with attached(agent, info.id) as term:
            await term.expect("done-64", timeout=60)

    run(session())
    client.console_close(info.id)
