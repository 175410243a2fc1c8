"""The agent event bridge (panel/guests/bridge.py, `manage.py agent_events`).

Its handler is fed agent-shaped events (hostagent.wire.Event, as the stream
decodes them), each case on its own: what each kind of event does to a
vserver and its operation. Its streams against a real agent (refreshing on
open, following events, coming back after the agent restarts) are in
test_live_e2e_agent.py; here, what a real agent does not do on demand (drop
a listener that fell behind: the agent's own API and event bus with pretend
guests, agentfake.py) and the bridge's following of the host list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import wire
from panel.guests import actions, bridge, events
from panel.guests.choices import OperationKindChoices, OperationStateChoices
from panel.guests.models import Operation, VServer
from panel.hosting.choices import HostStateChoices
from panel.hosting.models import Host
from tests.panel.live.agentfake import (
    StubClient,
    ThreadedAgent,
    agent_operation,
    lifecycle_event,
    operation_event,
)
from tests.panel.live.helpers import World, make_world

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, short_socket_dir: Path) -> World:
    monkeypatch.setattr(actions, "_dispatch", lambda op_id: None)
    return make_world(str(short_socket_dir / "agent.sock"))


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The vservers the bridge sent an event of, in order."""
    out: list[int] = []
    real = events.vserver_changed

    def record(vs_id: int, **kw: Any) -> None:
        out.append(vs_id)
        real(vs_id, **kw)

    monkeypatch.setattr(events, "vserver_changed", record)
    return out


def status_of(vs: VServer) -> tuple[str, int | None, int | None, str]:
    vs.refresh_from_db()
    return vs.status, vs.context_id, vs.init_pid, vs.status_message


# --- the handler ---------------------------------------------------------------------------------

def test_lifecycle_events_set_the_status_as_they_happen(world: World, sent: list[int]) -> None:
    agent = StubClient()
    h, vs = world.host, world.vs

    def say(action: str, state: str, **meta: Any) -> bool:
        return bridge.handle(h, lifecycle_event("shop", action, state, **meta), agent)  # type: ignore[arg-type]

    assert say(wire.EVENT_GUEST_STARTING, wire.STATE_STARTING)
    assert status_of(vs) == ("starting", None, None, "")
    agent.set("shop", wire.STATE_RUNNING, 49152, 4242)
    assert say(wire.EVENT_GUEST_STARTED, wire.STATE_RUNNING)
    assert status_of(vs) == ("running", 49152, 4242, "")  # context and pid from the agent
    assert not say(wire.EVENT_GUEST_UPDATED, wire.STATE_RUNNING)  # nothing new: no event
    assert say(wire.EVENT_GUEST_STOPPING, wire.STATE_STOPPING)
    assert status_of(vs) == ("stopping", 49152, 4242, "")  # still has them while it stops
    assert say(wire.EVENT_GUEST_OPERATION_FAILED, wire.STATE_RUNNING, kind="stop",
               error="it would not stop")
    assert status_of(vs)[0] == "running"
    assert status_of(vs)[3] == "stop failed on the host: it would not stop"
    agent.set("shop", wire.STATE_STOPPED)
    assert say(wire.EVENT_GUEST_EXITED, wire.STATE_STOPPED, how="exit")
    assert status_of(vs) == ("stopped", None, None, "stopped: its init ended on its own")
    assert sent == [vs.pk] * 5
    # A guest the panel does not know, and one on another host, are left alone.
    assert not bridge.handle(h, lifecycle_event("stray", wire.EVENT_GUEST_STARTED, "running"))
    other = Host.objects.create(name="node2", agent_socket="/nonexistent/2.sock")
    assert not bridge.handle(other, lifecycle_event("shop", wire.EVENT_GUEST_STARTED,
                                                    "running"))
    assert status_of(vs)[0] == "stopped" and len(sent) == 5


def test_a_deletion_is_the_panels_own_or_an_error(world: World) -> None:
    vs = world.vs
    ev = lifecycle_event("shop", wire.EVENT_GUEST_DELETED, wire.STATE_STOPPED)
    actions.delete_vserver(vs, actor=actions.Actor(world.users["olga"]), confirm="shop")
    assert not bridge.handle(world.host, ev)  # its own delete: the operation removes the row
    assert VServer.objects.get(pk=vs.pk).status == "deleting"
    Operation.objects.filter(vserver=vs).update(state=OperationStateChoices.STATE_FAILURE)
    assert bridge.handle(world.host, ev)  # deleted on the host by other means
    assert status_of(vs) == ("error", None, None, bridge.NO_SUCH_VSERVER)


def test_operation_events_move_the_panels_operation(world: World) -> None:
    olga = actions.Actor(world.users["olga"])
    start = actions.start_vserver(world.vs, actor=olga)
    theirs = agent_operation("start", "shop", wire.OP_PENDING)
    Operation.objects.filter(pk=start.pk).update(agent_operation=theirs["id"], progress=20)

    def op_says(**kw: Any) -> bool:
        return bridge.handle(world.host, operation_event({**theirs, **kw}))

    def op() -> Operation:
        return Operation.objects.get(pk=start.pk)

    assert not op_says()  # pending, as the panel's is
    assert op_says(state=wire.OP_RUNNING, progress=10, message="mounting")
    assert (op().state, op().progress, op().message) == ("running", 20, "mounting")  # never back
    assert op_says(state=wire.OP_RUNNING, progress=60, message="starting init")
    assert op().progress == 60
    assert op_says(state=wire.OP_SUCCESS, progress=100)
    assert (op().state, op().progress) == ("success", 100)  # a start is one agent operation
    assert not op_says(state=wire.OP_SUCCESS, progress=100)  # ended: left alone

    # A create is several: the build's success is not the create's, nor its percent
    # (the create's thread has steps of its own: 10 building, 70 starting); a failure is.
    _vs, create = actions.create_vserver(world.a, actor=olga, name="blog")
    build = agent_operation("build", "blog", wire.OP_RUNNING)
    Operation.objects.filter(pk=create.pk).update(agent_operation=build["id"], progress=10)
    assert bridge.handle(world.host, operation_event({**build, "progress": 50,
                                                      "message": "building the root tree"}))
    assert not bridge.handle(world.host, operation_event({**build, "state": wire.OP_SUCCESS,
                                                          "progress": 100}))
    got = Operation.objects.get(pk=create.pk)
    assert (got.state, got.progress, got.message) == ("running", 10, "building the root tree")
    assert bridge.handle(world.host, operation_event({**build, "state": wire.OP_FAILURE,
                                                      "error": "no space left"}))
    got = Operation.objects.get(pk=create.pk)
    assert (got.state, got.error, got.kind) == ("failure", "no space left",
                                                OperationKindChoices.KIND_CREATE)
    # Another agent operation (an exec of the console's, say) is nobody's here.
    assert not bridge.handle(world.host, operation_event(
        agent_operation("exec", "shop", wire.OP_RUNNING)))


# --- the streams ---------------------------------------------------------------------------------

@pytest.fixture
def agent(world: World) -> Iterator[ThreadedAgent]:
    a = ThreadedAgent(Path(world.host.agent_socket))
    try:
        yield a
    finally:
        a.close()


def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)


def test_a_listener_dropped_by_the_agent_listens_again(
        world: World, agent: ThreadedAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.05)
    agent.call(lambda: agent.agent.set("shop", wire.STATE_STOPPED))
    agent.call(lambda: agent.agent.set("bobs", wire.STATE_STOPPED))
    agent.start()
    said: list[str] = []
    stream = bridge.HostStream(world.host, said.append).start()
    try:
        eventually(lambda: stream.opened == 1 and agent.listeners() == 1)

        def drop_all() -> None:
            for lst in list(agent.agent.bus._listeners):
                agent.agent.bus.drop(lst, "fell behind: a test")

        agent.call(drop_all)
        eventually(lambda: stream.opened == 2 and agent.listeners() == 1)
        assert any("dropped by the agent: fell behind: a test" in s for s in said)
    finally:
        stream.stop()
        agent.stop()
        stream.thread.join(10)


def test_the_bridge_follows_the_host_list(world: World,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # No agent answers: each stream waits to retry, which stop() ends at once.
    monkeypatch.setattr(bridge, "BACKOFF_MIN", 0.05)
    b = bridge.Bridge(say=lambda s: None)
    Host.objects.create(name="off", agent_socket="/nonexistent/off.sock",
                        state=HostStateChoices.STATE_DISABLED)
    maint = Host.objects.create(name="maint", agent_socket="/nonexistent/m.sock",
                                state=HostStateChoices.STATE_MAINTENANCE)
    try:
        b.sync()
        assert {s.name for s in b.streams.values()} == {"node1", "maint"}
        Host.objects.filter(pk=maint.pk).update(state=HostStateChoices.STATE_DISABLED)
        streams = dict(b.streams)
        b.sync()
        assert {s.name for s in b.streams.values()} == {"node1"}
        assert streams[maint.pk].stop_event.is_set()
        streams[maint.pk].thread.join(10)
        assert not streams[maint.pk].thread.is_alive()
    finally:
        for s in b.streams.values():
            s.stop()
        for s in b.streams.values():
            s.thread.join(10)
