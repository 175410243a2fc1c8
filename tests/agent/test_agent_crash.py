"""Crash safety: the agent stopped or killed at any moment, and the one after it.

Guests outlive the agent; a build or start killed half-way leaves nothing
once the next agent has run its recovery; /dev/reboot works for guests the
agent re-adopted.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostagent import procfs, rebootmgr, wire
from hostagent.cgroup import Cgroup, cgroup_base
from hostagent.client import AgentClient
from hostagent.paths import Paths
from tests.agent.conftest import UPLINK, Lan, ip
from tests.helpers import AgentProcess

# The agent's rebootmgr accepts this many requests per guest a minute.
PER_MINUTE = inspect.signature(rebootmgr.RebootManager).parameters["per_minute"].default


def wait_for(cond: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.02)


@pytest.fixture
def agents(vroots: Paths) -> Iterator[list[AgentProcess]]:
    """Agents a test starts (one after the other); all ended at teardown."""
    made: list[AgentProcess] = []
    try:
        yield made
    finally:
        for a in made:
            a.kill(signal.SIGKILL)


def new_agent(agents: list[AgentProcess], paths: Paths, netns: str | None = None,
              env: dict[str, str] | None = None, wait: bool = True) -> AgentClient:
    a = AgentProcess(paths, netns, env).start(wait=wait)
    agents.append(a)
    return AgentClient(a.socket)


def build(client: AgentClient, name: str, **kw: object) -> None:
    client.run(client.build(wire.BuildRequest.from_json(
        {"name": name, "method": "busybox", **kw})))


def alive(pid: int, start: int) -> bool:
    return procfs.start_time(pid) == start


def leftovers(paths: Paths, name: str) -> list[str]:
    """What of guest NAME is left on the host besides its NAME.conf and tree."""
    found = []
    if paths.state(name).exists():
        found.append(f"state file {paths.state(name)}")
    if Cgroup(f"{cgroup_base()}/{name}").exists():
        found.append("its cgroup")
    if list((paths.rundir / "journal").glob("*")):
        found.append("journal entries")
    if rebootmgr.socket_dir(paths, name).exists():
        found.append("its /dev/reboot directory")
    return found


# --- guests outlive the agent ----------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_guests_keep_running_through_an_agent_restart_and_are_adopted(
        vroots: Paths, agents: list[AgentProcess], sig: int) -> None:
    client = new_agent(agents, vroots)
    for name in ("a", "b"):
        build(client, name)
        client.run(client.state(name, "start"))
    before = {g.name: g.init_pid for g in client.guests()}
    starts = {n: procfs.start_time(p) for n, p in before.items() if p}
    agents[-1].kill(sig)
    for name, pid in before.items():
        assert pid is not None and alive(pid, starts[name] or 0), f"{name} died with the agent"
    client = new_agent(agents, vroots)
    after = {g.name: (g.state, g.init_pid) for g in client.guests()}
    assert after == {n: (wire.STATE_RUNNING, p) for n, p in before.items()}
    assert client.run(client.exec("a", ["/bin/echo", "still here"]))["output"] == "still here\n"
    # The re-adopted guest's /dev/reboot is answered by the new agent.
    client.run(client.exec("a", ["/sbin/vreboot"]))
    wait_for(lambda: client.guest("a").init_pid not in (None, before["a"]),
             what="a restarted through /dev/reboot")
    assert client.guest("b").init_pid == before["b"]
    client.run(client.state("a", "stop"))
    client.run(client.state("b", "stop"))
    assert leftovers(vroots, "a") == [] and leftovers(vroots, "b") == []


def test_a_guest_that_dies_while_the_agent_is_down_is_cleaned_up_by_the_next(
        vroots: Paths, agents: list[AgentProcess]) -> None:
    client = new_agent(agents, vroots)
    build(client, "gone")
    pid = client.run(client.state("gone", "start"))["init_pid"]
    agents[-1].kill(signal.SIGKILL)
    Cgroup(f"{cgroup_base()}/gone").kill()
    wait_for(lambda: procfs.start_time(pid) is None, what="the guest to die")
    client = new_agent(agents, vroots)
    assert client.guest("gone").state == wire.STATE_STOPPED
    client.run(client.state("gone", "start"))
    client.run(client.state("gone", "stop"))
    assert leftovers(vroots, "gone") == []


# --- an operation killed half-way ---------------------------------------------------------

def hang_env(tmp: Path, step: str) -> tuple[dict[str, str], Path]:
    marker = tmp / f"hang-{step.replace(':', '-')}"
    return {"VPANEL_TEST_HANG_AT": step, "VPANEL_TEST_HANG_MARKER": str(marker)}, marker


def test_agent_killed_in_the_middle_of_a_build_leaves_no_half_built_guest(
        vroots: Paths, agents: list[AgentProcess], tmp_path: Path) -> None:
    env, marker = hang_env(tmp_path, "build:tree")
    client = new_agent(agents, vroots, env=env)
    client.build(wire.BuildRequest.from_json({"name": "half", "method": "busybox"}))
    wait_for(marker.exists, what="the build to reach its tree")
    assert vroots.root("half").exists() and not vroots.conf("half").exists()
    agents[-1].kill(signal.SIGKILL)
    client = new_agent(agents, vroots)
    assert not os.path.lexists(vroots.root("half"))
    assert not list(vroots.rootdir.glob(".half.*"))
    assert client.guests() == []
    assert leftovers(vroots, "half") == []
    (op,) = [o for o in (client.operation(o["id"]) for o in
                         client.request("GET", "/operations").json()) if o.kind == "build"]
    assert op.state == wire.OP_FAILURE and "interrupted" in (op.error or "")
    build(client, "half")  # the name is free again


@pytest.mark.parametrize("step", ["start:launched", "start:recorded"])
def test_agent_killed_in_the_middle_of_a_start_leaves_nothing_behind(
        lan: Lan, agents: list[AgentProcess], tmp_path: Path, step: str) -> None:
    paths = lan.paths
    env, marker = hang_env(tmp_path, step)
    client = new_agent(agents, paths, lan.host, env=env)
    build(client, "mid", ips=[lan.v4(10), lan.v6(10)])
    client.put_config("mid", {"IPROOTDEV": UPLINK})
    client.state("mid", "start")
    wait_for(marker.exists, what=f"the start to reach {step}")
    assert Cgroup(f"{cgroup_base()}/mid").procs(), "the half-started guest has processes"
    agents[-1].kill(signal.SIGKILL)
    client = new_agent(agents, paths, lan.host)
    assert client.guest("mid").state == wire.STATE_STOPPED
    assert leftovers(paths, "mid") == []
    host = ip("-n", lan.host, "-o", "link") + ip("-n", lan.host, "route") \
        + ip("-n", lan.host, "-6", "route") + ip("-n", lan.host, "-6", "neigh", "show", "proxy")
    assert "vs-mid" not in host and lan.v4(10) not in host and lan.v6(10) not in host, host
    # And the guest starts cleanly afterwards, with its network.
    client.run(client.state("mid", "start"))
    assert "FAILED" not in lan.http_get(lan.v4(10))
    client.run(client.state("mid", "stop"))


# --- /dev/reboot and the guest's own reboot ------------------------------------------------

@pytest.fixture
def pair(vroots: Paths, agents: list[AgentProcess]) -> tuple[AgentClient, dict[str, int]]:
    client = new_agent(agents, vroots)
    pids = {}
    for name in ("ga", "gb"):
        build(client, name)
        pids[name] = client.run(client.state(name, "start"))["init_pid"]
    return client, pids


def test_vreboot_restarts_only_its_own_guest(
        pair: tuple[AgentClient, dict[str, int]]) -> None:
    client, pids = pair
    client.run(client.exec("ga", ["/sbin/vreboot"]))
    wait_for(lambda: client.guest("ga").init_pid not in (None, pids["ga"]),
             what="ga to restart")
    wait_for(lambda: client.guest("ga").state == wire.STATE_RUNNING)
    assert client.guest("gb").init_pid == pids["gb"]


def test_a_payload_naming_another_guest_restarts_nobody(
        pair: tuple[AgentClient, dict[str, int]], vroots: Paths) -> None:
    client, pids = pair
    # What guest ga's root could write into its /dev/reboot, sent to the
    # socket behind it (busybox has no Unix socket client to do it from inside).
    for payload in (b"reboot gb\n", b"../gb\n", b'{"guest": "gb", "action": "reboot"}\n',
                    b"gb\n", b"reboot\ngb\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(rebootmgr.socket_path(vroots, "ga")))
            s.sendall(payload)
    time.sleep(1.0)
    assert {n: client.guest(n).init_pid for n in pids} == pids


def test_vhalt_stops_the_guest(pair: tuple[AgentClient, dict[str, int]]) -> None:
    client, _ = pair
    client.run(client.exec("ga", ["/sbin/vhalt"]))
    wait_for(lambda: client.guest("ga").state == wire.STATE_STOPPED, what="ga to stop")


@pytest.mark.parametrize(("command", "state"), [("reboot -f", wire.STATE_RUNNING),
                                                ("halt -f", wire.STATE_STOPPED)])
def test_the_guests_own_reboot_and_halt(pair: tuple[AgentClient, dict[str, int]],
                                        command: str, state: str) -> None:
    client, pids = pair
    # The exec ends with its guest: whatever it reports, the guest's state tells.
    client.wait(client.exec("ga", ["/bin/sh", "-c", command]), timeout=10)
    wait_for(lambda: client.guest("ga").init_pid != pids["ga"]
             and client.guest("ga").state == state, what=f"ga to end {state}")
    assert client.guest("gb").init_pid == pids["gb"]


def test_a_guest_read_while_it_halts_is_running_or_stopped_never_an_error(
        pair: tuple[AgentClient, dict[str, int]], agents: list[AgentProcess]) -> None:
    # GET /guests/NAME reads the guest's cgroup and /proc: a guest that ends
    # half-way through must read as stopped, not fail the request.
    import threading

    client, _ = pair
    errors: list[str] = []
    states: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        with AgentClient(agents[-1].socket) as c:
            while not stop.is_set():
                try:
                    states.add(c.guest("ga").state)
                except Exception as e:  # every failure is the finding
                    errors.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            client.wait(client.exec("ga", ["/bin/sh", "-c", "halt -f"]), timeout=10)
            wait_for(lambda: client.guest("ga").state == wire.STATE_STOPPED)
            client.run(client.state("ga", "start"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert wire.STATE_STOPPED in states and wire.STATE_RUNNING in states


def test_a_reboot_flood_costs_the_agent_nothing_lasting(
        pair: tuple[AgentClient, dict[str, int]], agents: list[AgentProcess],
        vroots: Paths) -> None:
    client, pids = pair
    agent = agents[-1]
    client.guests()
    fds = agent.fds()
    path = str(rebootmgr.socket_path(vroots, "ga"))
    deadline = time.monotonic() + 60
    for i in range(10_000):
        if time.monotonic() > deadline:
            break
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                s.sendall(b"reboot\n" if i % 2 else b"junk\n")
            except OSError:
                continue  # refused while its backlog is full: that is the throttle
    wait_for(lambda: client.guest("ga").state == wire.STATE_RUNNING, timeout=60)
    time.sleep(1.0)
    wait_for(lambda: client.guest("ga").state == wire.STATE_RUNNING, timeout=60)
    assert client.guest("gb").init_pid == pids["gb"]
    wait_for(lambda: agent.fds() <= fds + 2, timeout=10,
             what=f"the agent's fds back to {fds} (now {agent.fds()})")
    restarts = [o for o in client.request("GET", "/operations").json()
                if o["kind"] == "restart" and o["guest"] == "ga"]
    assert 1 <= len(restarts) <= PER_MINUTE, len(restarts)


# --- ONBOOT ----------------------------------------------------------------------------

def test_the_agent_starts_onboot_guests_once_per_boot(vroots: Paths,
                                                      agents: list[AgentProcess]) -> None:
    from hostagent import guest

    for name, onboot in (("first", True), ("second", True), ("manual", False)):
        guest.build(vroots, name, guest.BuildOptions(method="busybox", onboot=onboot))
    guest.set_key(vroots, "first", "PRIORITY", "10")
    a = AgentProcess(vroots).start(onboot=True)
    agents.append(a)
    client = AgentClient(a.socket)
    wait_for(lambda: {g.name for g in client.guests() if g.state == wire.STATE_RUNNING}
             == {"first", "second"}, what="the ONBOOT guests to start")
    (onboot_op,) = [o for o in client.request("GET", "/operations").json()
                    if o["kind"] == "onboot"]
    assert client.wait(onboot_op["id"]).result == {"started": ["first", "second"],
                                                    "failed": {}}
    client.run(client.state("second", "stop"))  # the admin stops one
    a.stop()
    a = AgentProcess(vroots).start(onboot=True)
    agents.append(a)
    client = AgentClient(a.socket)
    (onboot_op,) = [o for o in client.request("GET", "/operations").json()
                    if o["kind"] == "onboot"]
    assert "skipped" in (client.wait(onboot_op["id"]).result or {})
    assert client.guest("second").state == wire.STATE_STOPPED
    assert client.guest("first").state == wire.STATE_RUNNING


def test_a_restart_from_the_command_line_is_not_undone_by_the_agent(
        vroots: Paths, agents: list[AgentProcess]) -> None:
    import subprocess
    import sys

    client = new_agent(agents, vroots)
    build(client, "cli")
    first = client.run(client.state("cli", "start"))["init_pid"]
    vserver = str(Path(sys.executable).parent / "vserver")
    subprocess.run([vserver, "cli", "restart"], check=True, capture_output=True, timeout=60)
    time.sleep(3)  # the agent saw the old PID 1 end, and rescans every 2 s
    info = client.guest("cli")
    assert info.state == wire.STATE_RUNNING and info.init_pid not in (None, first)
    client.run(client.state("cli", "stop"))
