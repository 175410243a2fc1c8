"""The agent's REST API, through a real `hostagent serve` on a real Unix socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import guest, wire
from hostagent.client import AgentClient, AgentError
from hostagent.limits import controller_hierarchies
from hostagent.paths import Paths
from tests.helpers import AgentProcess


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


class EventLog:
    """Events of one listener, collected in a thread from the NDJSON stream."""

    def __init__(self, sock: Path, query: str = "") -> None:
        self.events: list[wire.Event] = []
        self._client = AgentClient(sock)
        self._query = query
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.2)  # subscribed before the test acts

    def _run(self) -> None:
        try:
            for ev in self._client.events():
                self.events.append(ev)
        except Exception:  # the agent went away: the test looks at what came
            return

    def lifecycle(self, name: str) -> list[str]:
        return [e.action for e in self.events
                if e.type == wire.TYPE_LIFECYCLE and e.guest == name]

    def wait_for(self, name: str, action: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while action not in self.lifecycle(name):
            assert time.monotonic() < deadline, f"no {action} for {name}: {self.lifecycle(name)}"
            time.sleep(0.02)


def build(client: AgentClient, name: str, **kw: object) -> None:
    req = wire.BuildRequest.from_json({"name": name, "method": "busybox", **kw})
    client.run(client.build(req))


def raw_request(sock: Path, data: bytes) -> tuple[int, dict[str, object]]:
    """Send DATA as is and parse the status and JSON body of the reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --- the whole life of a guest ------------------------------------------------------

def test_api_builds_starts_execs_stops_and_deletes_a_guest_with_events_in_order(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    log = EventLog(agent.socket)
    build(client, "web", hostname="web.example", description="the web server")
    assert client.guest("web").state == wire.STATE_STOPPED
    started = client.run(client.state("web", "start"))
    info = client.guest("web")
    assert (info.state, info.init_pid, info.context) == (
        wire.STATE_RUNNING, started["init_pid"], started["context"])
    result = client.run(client.exec("web", ["/bin/sh", "-c", "hostname; echo oops >&2; exit 3"]))
    assert result == {"exit_code": 3, "output": "web.example\noops\n", "truncated": False}
    rows = client.processes("web")
    assert 1 in {r.guest_pid for r in rows}
    assert all(r.pid > 1 for r in rows)
    client.run(client.state("web", "stop"))
    assert not guest.running(vroots, "web")
    client.run(client.delete("web"))
    assert not vroots.conf("web").exists() and not vroots.root("web").exists()
    log.wait_for("web", wire.EVENT_GUEST_DELETED)
    assert log.lifecycle("web") == [
        wire.EVENT_GUEST_BUILDING, wire.EVENT_GUEST_CREATED,
        wire.EVENT_GUEST_STARTING, wire.EVENT_GUEST_STARTED,
        wire.EVENT_GUEST_STOPPING, wire.EVENT_GUEST_STOPPED,
        wire.EVENT_GUEST_DELETING, wire.EVENT_GUEST_DELETED,
    ]
    states = [e.metadata["state"] for e in log.events
              if e.type == wire.TYPE_LIFECYCLE and e.guest == "web"]
    assert states == ["building", "stopped", "starting", "running", "stopping", "stopped",
                      "deleting", "stopped"]
    ops = [e.metadata for e in log.events if e.type == wire.TYPE_OPERATION]
    for op_id in {o["id"] for o in ops}:
        seq = [o["state"] for o in ops if o["id"] == op_id]
        assert seq[0] == wire.OP_PENDING and seq[-1] == wire.OP_SUCCESS, seq


def test_list_of_guests_carries_each_state_in_one_call(client: AgentClient) -> None:
    build(client, "one")
    build(client, "two")
    client.run(client.state("two", "start"))
    states = {g.name: g.state for g in client.guests()}
    assert states == {"one": wire.STATE_STOPPED, "two": wire.STATE_RUNNING}
    host = client.host()
    assert (host.guests, host.running, host.api_version) == (2, 1, "1.0")
    assert host.cgroup in ("v1", "v2")


def test_curl_over_the_unix_socket(agent: AgentProcess, client: AgentClient) -> None:
    build(client, "cu")
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(agent.socket),
                          "http://agent/1.0/guests"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert [g["name"] for g in json.loads(out)] == ["cu"]
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(agent.socket), "-X", "PUT",
                          "-d", '{"action": "start"}', "http://agent/1.0/guests/cu/state"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    op = json.loads(out)
    assert op["state"] in (wire.OP_PENDING, wire.OP_RUNNING)
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(agent.socket),
                          f"http://agent/1.0/operations/{op['id']}/wait?timeout=30"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out)["state"] == wire.OP_SUCCESS


def test_stop_with_force_and_restart_give_a_new_init(client: AgentClient,
                                                     vroots: Paths) -> None:
    build(client, "rs")
    first = client.run(client.state("rs", "start"))["init_pid"]
    second = client.run(client.state("rs", "restart", timeout=1))["init_pid"]
    assert first != second and guest.running(vroots, "rs")
    assert client.run(client.state("rs", "stop", force=True)) == {"was_running": True}
    assert client.run(client.state("rs", "stop")) == {"was_running": False}


def test_operations_on_one_guest_run_in_order_and_a_pending_one_can_be_cancelled(
        client: AgentClient) -> None:
    build(client, "q")
    start = client.state("q", "start")
    stop = client.state("q", "stop")
    again = client.state("q", "start")
    cancelled = client.cancel(again.id)
    assert cancelled.state == wire.OP_CANCELLED
    assert client.wait(start).state == wire.OP_SUCCESS
    assert client.wait(stop).state == wire.OP_SUCCESS
    assert client.guest("q").state == wire.STATE_STOPPED
    with pytest.raises(AgentError) as e:
        client.cancel(stop.id)
    assert e.value.status == 409


def test_exec_is_killed_after_its_timeout(client: AgentClient) -> None:
    build(client, "slow")
    client.run(client.state("slow", "start"))
    t0 = time.monotonic()
    result = client.run(client.exec("slow", ["/bin/sleep", "30"], timeout=0.5))
    assert result["exit_code"] == 137 and time.monotonic() - t0 < 20


# --- config ------------------------------------------------------------------------

def test_config_put_needs_the_current_etag_and_applies_all_or_nothing(
        client: AgentClient, vroots: Paths) -> None:
    build(client, "cf")
    cfg = client.config("cf")
    assert cfg.values["S_HOSTNAME"] == "cf"
    new, applied = client.put_config("cf", {"S_HOSTNAME": "renamed", "PIDS_MAX": "200"},
                                     cfg.etag)
    assert new.values["S_HOSTNAME"] == "renamed" and new.values["PIDS_MAX"] == "200"
    assert new.etag != cfg.etag and applied
    before = vroots.conf("cf").read_bytes()
    with pytest.raises(AgentError) as e:
        client.put_config("cf", {"S_HOSTNAME": "again"}, cfg.etag)  # stale
    assert (e.value.status, e.value.field) == (412, "If-Match")
    with pytest.raises(AgentError) as e:
        client.put_config("cf", {"S_HOSTNAME": "fine", "PIDS_MAX": "lots"}, new.etag)
    assert e.value.status == 400 and e.value.field == "PIDS_MAX"
    with pytest.raises(AgentError) as e:
        client.put_config("cf", {"NOT_A_KEY": "1"}, new.etag)
    assert e.value.status == 400 and e.value.field == "values.NOT_A_KEY"
    assert vroots.conf("cf").read_bytes() == before


def test_config_put_on_a_running_guest_applies_a_limit_at_once(client: AgentClient,
                                                               vroots: Paths) -> None:
    build(client, "lim")
    client.run(client.state("lim", "start"))
    _, applied = client.put_config("lim", {"PIDS_MAX": "77"})
    assert any("77" in line for line in applied), applied
    st = guest.read_state(vroots, "lim")
    assert st is not None
    hier = controller_hierarchies()["pids"]
    path = hier.mount / st.cgroup.lstrip("/") / "pids.max"
    assert path.read_text().strip() == "77"


# --- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "body", "status", "field"), [
    ("GET", "/1.0/nothing", None, 404, None),
    ("GET", "/2.0/guests", None, 404, None),
    ("PATCH", "/1.0/guests", b"{}", 405, None),
    ("POST", "/1.0/guests", b"{not json", 400, "body"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "busybox", "x": 1}', 400, "x"),
    ("POST", "/1.0/guests", b'{"name": "../etc", "method": "busybox"}', 400, "name"),
    ("POST", "/1.0/guests", b'{"name": "-rf", "method": "busybox"}', 400, "name"),
    ("POST", "/1.0/guests", b'{"name": "a\\u0000b", "method": "busybox"}', 400, "name"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "rootfs", "source": "/etc"}', 400,
     "source"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "rootfs", "source": "../x"}', 400,
     "source"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "busybox", "ips": ["ALL"]}', 400,
     "ips.0"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "busybox", "ips": ["1.2.3.999"]}', 400,
     "ips.0"),
    ("POST", "/1.0/guests", b'{"name": "ok", "method": "busybox", "nice": "5"}', 400, "nice"),
    ("POST", "/1.0/guests", b"[1, 2]", 400, None),
    ("PUT", "/1.0/guests/Bad..Name/state", b'{"action": "start"}', 400, "name"),
    ("PUT", "/1.0/guests/nope/state", b'{"action": "start"}', 404, "name"),
    ("GET", "/1.0/operations/nope", None, 404, "id"),
    ("GET", "/1.0/events?type=gossip", None, 400, "type"),
    ("GET", "/1.0/events?processes=..", None, 400, "processes"),
])
def test_bad_requests_get_a_json_error_naming_the_field(
        agent: AgentProcess, method: str, path: str, body: bytes | None, status: int,
        field: str | None) -> None:
    data = body or b""
    req = (f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    got, reply = raw_request(agent.socket, req)
    assert got == status, reply
    assert reply["status"] == status and reply["error"]
    if field is not None:
        assert reply["field"] == field, reply
    assert not list(agent.paths.confdir.glob("*.conf"))


def test_oversized_body_is_refused_before_it_is_read(agent: AgentProcess) -> None:
    head = (f"POST /1.0/guests HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            f"Content-Length: {wire.MAX_BODY + 1}\r\nConnection: close\r\n\r\n").encode()
    status, reply = raw_request(agent.socket, head + b" " * 1024)
    assert status == 413 and reply["status"] == 413


def test_the_socket_is_open_to_root_and_the_agents_group_only(
        agent: AgentProcess, client: AgentClient, vroots: Paths) -> None:
    import grp

    build(client, "perm")  # operations re-create the run directory's mode
    sock, run = os.stat(agent.socket), os.stat(vroots.rundir)
    try:
        group = grp.getgrnam("vpanel").gr_gid
    except KeyError:  # no such group here: root only
        assert sock.st_mode & 0o077 == 0 and run.st_mode & 0o077 == 0
        return
    assert (sock.st_mode & 0o777, sock.st_gid) == (0o660, group)
    assert (run.st_mode & 0o777, run.st_gid) == (0o710, group)


def _request_as_nobody(sock: Path) -> subprocess.CompletedProcess[str]:
    code = ("import socket,sys;s=socket.socket(socket.AF_UNIX);"
            f"s.connect({str(sock)!r});"
            "s.sendall(b'GET /1.0/guests HTTP/1.1\\r\\nHost: a\\r\\n"
            "Connection: close\\r\\n\\r\\n');"
            "sys.stdout.write(s.recv(65536).decode())")
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=30, check=False, user=65534, group=65534, extra_groups=[])


def test_a_caller_outside_root_and_the_group_is_refused(agent: AgentProcess,
                                                       vroots: Paths) -> None:
    # The file mode stops it first...
    opened = [p for p in [agent.socket.parent, *agent.socket.parent.parents]
              if p != Path("/") and not os.stat(p).st_mode & 0o001]
    modes = {p: os.stat(p).st_mode & 0o7777 for p in opened}
    try:
        for p in opened:  # let uid 65534 walk down to the socket
            os.chmod(p, modes[p] | 0o001)
        res = _request_as_nobody(agent.socket)
        assert "Permission denied" in res.stderr
        # ...and were the socket opened by mistake, the peer check still does.
        os.chmod(agent.socket, 0o666)  # noqa: S103 - the mistake this test makes
        res = _request_as_nobody(agent.socket)
        assert res.stdout.startswith("HTTP/1.1 403"), res.stdout + res.stderr
        assert '"status":403' in res.stdout
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)


def test_stats_and_quotas_cover_every_guest(client: AgentClient) -> None:
    build(client, "st")
    build(client, "idle")
    client.run(client.state("st", "start"))
    (row,) = client.stats()
    assert row.name == "st" and row.processes >= 1 and row.uptime >= 0
    assert {q["name"] for q in client.quotas()} == {"st", "idle"}


def test_events_over_a_websocket_with_a_guests_process_list(agent: AgentProcess,
                                                           client: AgentClient) -> None:
    import asyncio

    import aiohttp

    build(client, "ws")
    client.run(client.state("ws", "start"))

    async def listen() -> list[dict[str, object]]:
        conn = aiohttp.UnixConnector(path=str(agent.socket))
        async with aiohttp.ClientSession(connector=conn) as session, session.ws_connect(
                "http://agent/1.0/events?type=lifecycle&processes=ws&interval=0.5") as ws:
            got = []
            async for msg in ws:
                got.append(msg.json())
                if len(got) == 2:
                    break
            return got

    events = asyncio.run(asyncio.wait_for(listen(), 30))
    assert [e["type"] for e in events] == [wire.TYPE_PROCESSES] * 2
    rows = events[0]["metadata"]["processes"]  # type: ignore[index]
    assert 1 in {r["guest_pid"] for r in rows}


def test_the_client_makes_a_template_from_a_stopped_guest_and_lists_it(
        client: AgentClient) -> None:
    build(client, "src")
    op = client.create_template(wire.TemplateCreate(name="tpl", method="guest", source="src"))
    assert op.guest == "template:tpl"
    client.run(op)
    assert "tpl" in {t.name for t in client.templates()}
    client.delete_template("tpl")


def test_the_process_that_waits_for_an_exec_keeps_none_of_the_agents_descriptors(
        client: AgentClient, agent: AgentProcess) -> None:
    build(client, "fdw")
    client.run(client.state("fdw", "start"))
    client.exec("fdw", ["/bin/sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        waiter = None
        while waiter is None:
            assert time.monotonic() < deadline, "no exec'd sleep appeared"
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if cmd == b"/bin/sleep\x0030\x00":
                    waiter = ppid
            time.sleep(0.05)
        # The waiter (a fork of the agent) holds its stdio and at most a pidfd
        # of the command; before, it held every socket and file of the agent.
        held = [int(fd) for fd in os.listdir(f"/proc/{waiter}/fd")]
        assert len([fd for fd in held if fd > 2]) <= 2, (held, agent.fds())
    finally:
        client.run(client.state("fdw", "stop", force=True))
