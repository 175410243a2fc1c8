"""The live pages' promise (STYLE.md, after Zulip's verify_action): the state a page
loaded, plus the events it received, equals a fresh fetch.

Pages: a member's dashboard, staff's dashboard, and the member's page of one
vserver (watching its usage and processes), all open while a random sequence
of changes happens, each the way production makes it:

  - actions by the customers' owners (start, stop, restart, create, delete,
    new limits), their operations recorded and not handed to an agent;
  - the agent's part of those operations, as agent-shaped lifecycle and
    operation events (progress included) through the bridge's handler
    (panel/guests/bridge.py), then what the panel's operation thread does
    when the agent's operation ends (agent.refresh_status, the result, the
    event);
  - a guest halting by itself; the bridge's refresh when its stream reopens
    (reconcile.refresh_host); the member gaining and losing a customer;
  - samples of the watched vserver's processes and usage, published by the
    process's ProcessWatcher as its agent stream does (the stream itself is a
    queue here: no agent).

The random interleavings of agent events (progress at any point, failures)
are what a real guest cannot make on demand, hence the agent-shaped events
(tests/panel/live/test_live_e2e_agent.py checks the real agent's).

At the end each page's state (its first message, then every `vserver`,
`deleted`, `plan` and `processes` applied in order) must equal a fresh
fetch: events.state_for(user) and events.plans_for(user) for a dashboard
(status, operations with their progress, limits; the customers' usage
bars), events.detail(vs) for the vserver's page (with its recent
operations) and what the watcher would give a page that starts watching
now (the last sample's usage). Several seeds, both channel layers.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.utils import timezone

from hostagent import wire
from panel.guests import actions, agent, bridge, events, processes, reconcile
from panel.guests.choices import OperationKindChoices, OperationStateChoices
from panel.guests.models import Operation, VServer
from panel.hosting.choices import RoleChoices
from panel.hosting.models import Customer, Membership
from tests.panel.factories import make_vserver
from tests.panel.live.agentfake import (
    StubClient,
    agent_operation,
    lifecycle_event,
    operation_event,
)
from tests.panel.live.helpers import (
    connect,
    make_world,
    messages_until,
    run,
    session_cookie,
    sync,
)

pytestmark = [pytest.mark.django_db(transaction=True)]

STEPS = 60
SEEDS = (1, 2, 3, 4)

# kind -> (lifecycle event as it begins, its state), (as it ends, the state after)
AGENT_VERBS = {
    OperationKindChoices.KIND_START: ((wire.EVENT_GUEST_STARTING, "starting"),
                                      (wire.EVENT_GUEST_STARTED, "running")),
    OperationKindChoices.KIND_STOP: ((wire.EVENT_GUEST_STOPPING, "stopping"),
                                     (wire.EVENT_GUEST_STOPPED, "stopped")),
    OperationKindChoices.KIND_RESTART: ((wire.EVENT_GUEST_RESTARTING, "restarting"),
                                        (wire.EVENT_GUEST_RESTARTED, "running")),
    OperationKindChoices.KIND_CREATE: ((wire.EVENT_GUEST_BUILDING, "building"),
                                       (wire.EVENT_GUEST_STARTED, "running")),
    OperationKindChoices.KIND_DELETE: ((wire.EVENT_GUEST_DELETING, "deleting"),
                                       (wire.EVENT_GUEST_DELETED, "stopped")),
}


@dataclass
class Host:
    """The pretend host: its agent's answers, and the agent operation of each panel one."""

    client: StubClient = field(default_factory=StubClient)
    theirs: dict[int, dict[str, Any]] = field(default_factory=dict)  # panel op id -> agent op
    contexts: int = 49152


def page_state(vservers: dict[int, dict[str, Any]] | None = None,
               plans: dict[int, dict[str, Any]] | None = None,
               sample: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a page shows: its vservers by id, its customers' usage bars by customer id,
    and (a vserver's page that watches) the last sample of processes and usage."""
    return {"vservers": dict(vservers or {}), "plans": dict(plans or {}), "sample": sample}


def apply(page: dict[str, Any], msg: dict[str, Any]) -> None:
    """What a page does with a message: the state it shows afterwards."""
    if msg["type"] == "state":
        page["vservers"] = {v["id"]: v for v in msg["vservers"]}
        page["plans"] = {p["customer"]: p for p in msg.get("plans", [])}
    elif msg["type"] == "vserver":
        page["vservers"][msg["vserver"]["id"]] = msg["vserver"]
    elif msg["type"] == "deleted":
        page["vservers"].pop(msg["vserver"]["id"], None)
    elif msg["type"] == "plan":
        if msg["plan"]["bars"] is None:
            page["plans"].pop(msg["plan"]["customer"], None)
        else:
            page["plans"][msg["plan"]["customer"]] = msg["plan"]
    elif msg["type"] == "processes":
        page["sample"] = msg


class Samples:
    """The watched vserver's agent stream, played by the test: ProcessWatcher._stream
    replaced by one that publishes, through the watcher's own message and publishing
    code, each sample put in its queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[wire.Event, dict[str, Any]]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def stream(self, watcher: processes.ProcessWatcher, vs_id: int, socket: str,
                     name: str) -> None:
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        while True:
            event, usage = await self.queue.get()
            message = watcher._message(vs_id, event)
            if message["running"]:
                message["usage"].update(usage)  # what _Usage.fill asks the agent
            await watcher._publish(vs_id, message)

    def put(self, event: wire.Event, usage: dict[str, Any]) -> None:
        """From the test's steps (another thread)."""
        assert self.loop is not None and self.queue is not None, "nobody watches"
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, usage))


class Scenario:
    def __init__(self, seed: int, samples: Samples) -> None:
        self.rnd = random.Random(seed)  # noqa: S311 (a reproducible sequence, not a secret)
        self.w = make_world()
        self.samples = samples
        self.host = Host()
        for vs in (self.w.vs, self.w.theirs):
            self.host.client.set(vs.name, wire.STATE_STOPPED)
        # The member's customer that never changes: its vserver is the end-of-run marker.
        self.c = Customer.objects.create(name="Marker", slug="marker", plan=self.w.a.plan)
        Membership.objects.create(customer=self.c, user=self.w.users["alice"],
                                  role=RoleChoices.ROLE_MEMBER)
        self.marker = make_vserver(self.c, self.w.host, name="marker", ipv4=0)
        self.host.client.set("marker", wire.STATE_STOPPED)
        self.names = iter(f"vs{i}" for i in range(1000))
        self.log: list[str] = []

    # --- the changes (sync: each runs in a thread, as a view or the bridge does) ---

    def owner(self, vs: VServer) -> actions.Actor:
        return actions.Actor(self.w.users["olga" if vs.customer_id == self.w.a.pk else "bob"])

    def step(self) -> None:
        rnd = self.rnd
        choice = rnd.choices(
            ["action", "agent-begin", "agent-progress", "agent-end", "exit", "membership",
             "create", "delete", "refresh", "limits", "sample"],
            weights=[6, 6, 3, 6, 1, 1, 2, 2, 1, 2, 3])[0]
        vservers = list(VServer.objects.exclude(pk=self.marker.pk).order_by("pk"))
        pending = list(Operation.objects.filter(
            state__in=["pending", "running"], vserver__isnull=False,
            kind__in=list(AGENT_VERBS)).order_by("pk"))
        if choice == "action" and vservers:
            vs = rnd.choice(vservers)
            verb = rnd.choice(["start", "stop", "restart"])
            try:
                getattr(actions, f"{verb}_vserver")(vs, actor=self.owner(vs))
                self.log.append(f"{verb} {vs.name}")
            except actions.ActionError as e:
                self.log.append(f"{verb} {vs.name}: refused ({e.message})")
        elif choice == "agent-begin" and pending:
            op = rnd.choice([o for o in pending if o.pk not in self.host.theirs] or pending)
            self.begin(op)
        elif choice == "agent-progress" and self.host.theirs:
            op_id = rnd.choice(sorted(self.host.theirs))
            theirs = self.host.theirs[op_id]
            theirs["progress"] = min(99, theirs["progress"] + rnd.randint(1, 40))
            theirs["message"] = rnd.choice(["mounting", "waiting", "almost"])
            self.bridge(operation_event(theirs))
            self.log.append(f"progress of op {op_id}: {theirs['progress']}")
        elif choice == "agent-end" and self.host.theirs:
            self.end(rnd.choice(sorted(self.host.theirs)), ok=rnd.random() < 0.85)
        elif choice == "exit":
            running = [vs for vs in vservers if vs.status == "running"]
            if running:
                vs = rnd.choice(running)
                self.host.client.set(vs.name, wire.STATE_STOPPED)
                self.bridge(lifecycle_event(vs.name, wire.EVENT_GUEST_EXITED, "stopped",
                                            how="halt"))
                self.log.append(f"{vs.name} halts")
        elif choice == "membership":
            alice = self.w.users["alice"]
            gone, _ = Membership.objects.filter(customer=self.w.b, user=alice).delete()
            if not gone:
                Membership.objects.create(customer=self.w.b, user=alice,
                                          role=RoleChoices.ROLE_MEMBER)
            self.log.append("alice leaves B" if gone else "alice joins B")
        elif choice == "create":
            customer = self.rnd.choice([self.w.a, self.w.b])
            who = self.w.users["olga" if customer == self.w.a else "bob"]
            vs, _ = actions.create_vserver(customer, actor=actions.Actor(who),
                                           name=next(self.names))
            self.log.append(f"create {vs.name}")
        elif choice == "delete":
            idle = [vs for vs in vservers if vs.status in ("stopped", "error")
                    and vs.pk != self.w.vs.pk]
            if idle:
                vs = rnd.choice(idle)
                actions.delete_vserver(vs, actor=self.owner(vs), confirm=vs.name)
                self.log.append(f"delete {vs.name}")
        elif choice == "refresh":
            reconcile.refresh_host(self.w.host, self.host.client)  # type: ignore[arg-type]
            self.log.append("the bridge's stream reopens: refresh")
        elif choice == "limits" and vservers:
            vs = rnd.choice(vservers)
            memory = rnd.choice([128, 256, 512, 1024])
            op = actions.set_limits(vs, actor=self.owner(vs), memory_mb=memory,
                                    cpu_cores=rnd.choice(["0.5", "1", "1.25"]),
                                    disk_gb=rnd.randint(1, 4))
            # The operation's thread: the agent takes the new limits, then the event.
            Operation.objects.filter(pk=op.pk).update(
                state=OperationStateChoices.STATE_SUCCESS, progress=100, message="done",
                updated=timezone.now())
            events.vserver_changed(vs.pk)
            self.log.append(f"limits of {vs.name}: {memory} MiB")
        elif choice == "sample":
            running = rnd.random() < 0.8
            rows = [{"pid": 4000 + i, "guest_pid": i + 1, "user": "root",
                     "cpu": float(rnd.randint(0, 50)), "mem": 0.5, "rss": 1 << 20,
                     "command": f"p{i}"} for i in range(rnd.randint(1, 4))] if running else []
            event = wire.Event.from_json({
                "type": wire.TYPE_PROCESSES, "timestamp": time.time(), "guest": "shop",
                "action": "processes", "metadata": {"running": running, "processes": rows}})
            self.samples.put(event, {"memory": rnd.randint(1, 200) << 20,
                                     "disk": rnd.choice([None, rnd.randint(1, 900) << 20])})
            self.log.append(f"a sample of shop ({'running' if running else 'stopped'})")

    def bridge(self, event: wire.Event) -> None:
        bridge.handle(self.w.host, event, self.host.client)  # type: ignore[arg-type]

    def begin(self, op: Operation) -> None:
        """The agent takes the operation: what agent._Run.follow records, then its events."""
        vs = op.vserver
        assert vs is not None
        theirs = agent_operation("build" if op.kind == "create" else op.kind, vs.name,
                                 wire.OP_RUNNING)
        self.host.theirs[op.pk] = theirs
        Operation.objects.filter(pk=op.pk).update(
            agent_operation=theirs["id"], state=OperationStateChoices.STATE_RUNNING,
            progress=10, message=f"{op.kind}ing", updated=timezone.now())
        events.vserver_changed(vs.pk)  # _Run.progress
        if op.kind == "create":
            self.host.client.set(vs.name, wire.STATE_BUILDING)
        (action, state), _ = AGENT_VERBS[op.kind]
        self.bridge(lifecycle_event(vs.name, action, state, operation=theirs["id"]))
        self.bridge(operation_event(theirs))
        self.log.append(f"agent begins {op.kind} of {vs.name}")

    def end(self, op_id: int, ok: bool) -> None:
        """The agent's operation ends; then what agent.run does once it sees that."""
        theirs = self.host.theirs.pop(op_id)
        op = Operation.objects.select_related("vserver__host").get(pk=op_id)
        vs = op.vserver
        if vs is None or op.done:
            return
        _, (action, state) = AGENT_VERBS[op.kind]
        if ok:
            if state == "running":
                self.host.contexts += 1
                self.host.client.set(vs.name, state, self.host.contexts, 4000 + op_id)
            elif op.kind == "delete":
                self.host.client.state.pop(vs.name, None)
            else:
                self.host.client.set(vs.name, state)
            theirs.update(state=wire.OP_SUCCESS, progress=100)
            self.bridge(operation_event(theirs))
            self.bridge(lifecycle_event(vs.name, action, state, operation=theirs["id"]))
        else:
            before = self.host.client.state.get(vs.name, (wire.STATE_STOPPED, None, None))
            if before[0] in ("building", "starting", "stopping", "restarting", "deleting"):
                self.host.client.set(vs.name, wire.STATE_STOPPED)
            theirs.update(state=wire.OP_FAILURE, error="the host said no")
            self.bridge(operation_event(theirs))
            self.bridge(lifecycle_event(vs.name, wire.EVENT_GUEST_OPERATION_FAILED,
                                        self.host.client.state[vs.name][0], kind=op.kind,
                                        error="the host said no", operation=theirs["id"]))
        # agent.run, after the agent's operation: the row (a delete), the result, the status.
        if ok and op.kind == "delete":
            VServer.objects.filter(pk=vs.pk).delete()
        Operation.objects.filter(pk=op.pk).update(
            state=OperationStateChoices.STATE_SUCCESS if ok
            else OperationStateChoices.STATE_FAILURE,
            progress=100 if ok else op.progress, error="" if ok else "500: the host said no",
            updated=timezone.now())
        if VServer.objects.filter(pk=vs.pk).exists():
            agent.refresh_status(vs, self.host.client)  # type: ignore[arg-type]
        events.vserver_changed(vs.pk, customer_id=vs.customer_id)
        self.log.append(f"agent ends {op.kind} of {vs.name}: {'ok' if ok else 'failed'}")


def dashboard_fetch(user: Any) -> dict[str, Any]:
    return page_state(events.state_for(user), events.plans_for(user))


def vserver_fetch(vs_id: int) -> dict[str, Any]:
    """The vserver's page afresh: what it loads, and what a page that started watching
    now would be sent at once (the watcher's last sample)."""
    last = processes.WATCHER.last(vs_id)
    return page_state({vs_id: events.detail(VServer.objects.get(pk=vs_id))},
                      sample=None if last is None else processes.to_page(last))


@pytest.mark.parametrize("seed", SEEDS)
def test_the_state_loaded_plus_the_events_equals_a_fresh_fetch(
        channel_layer: str, seed: int, monkeypatch: pytest.MonkeyPatch, watcher: Any) -> None:
    monkeypatch.setattr(actions, "_dispatch", lambda op_id: None)
    samples = Samples()
    monkeypatch.setattr(processes.ProcessWatcher, "_stream",
                        lambda self, *a: samples.stream(self, *a))
    s = Scenario(seed, samples)
    alice, staff = s.w.users["alice"], s.w.users["staff"]
    cookies = {"alice": session_cookie(alice), "staff": session_cookie(staff)}
    shop = s.w.vs.pk

    async def go() -> None:
        pages: dict[str, Any] = {}
        states: dict[str, dict[str, Any]] = {}
        for name, path, cookie in (("alice", "/ws/vservers/", cookies["alice"]),
                                   ("staff", "/ws/vservers/", cookies["staff"]),
                                   ("shop", f"/ws/vservers/{shop}/", cookies["alice"])):
            # What the page loaded, then its socket's first message (the same, read later).
            loaded = (await sync(dashboard_fetch)(alice if name != "staff" else staff)
                      if name != "shop" else await sync(vserver_fetch)(shop))
            comm, first = await connect(path, cookie)
            states[name] = loaded
            apply(states[name], first)
            pages[name] = comm
        # The vserver's page watches: its usage and processes, as samples come.
        await pages["shop"].send_json_to({"type": "watch-processes"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while samples.queue is None:
            assert loop.time() < deadline, "the watcher did not start its stream"
            await asyncio.sleep(0.01)

        async def dashboards_caught_up() -> None:
            """A change of the marker, after every other change: once a dashboard has it,
            it has had everything sent before (one channel per page, in order)."""
            await sync(events.vserver_changed)(s.marker.pk)
            for name in ("alice", "staff"):
                for msg in await messages_until(pages[name], lambda m: m.get(
                        "vserver", {}).get("id") == s.marker.pk):
                    apply(states[name], msg)

        for _ in range(STEPS):
            await sync(s.step)()
            # The dashboards after every step; the vserver page at the end.
            await dashboards_caught_up()
            steps = "\n  ".join(s.log)
            assert states["alice"] == await sync(dashboard_fetch)(alice), steps
            assert states["staff"] == await sync(dashboard_fetch)(staff), steps
        while not await pages["shop"].receive_nothing(timeout=0.5):
            apply(states["shop"], await pages["shop"].receive_json_from())
        steps = "\n  ".join(s.log)
        assert states["shop"] == await sync(vserver_fetch)(shop), steps
        for comm in pages.values():
            await comm.disconnect()

    run(go)
    # The run did something: operations ran on the pretend agent both ways, the bars
    # moved, samples came.
    states = set(Operation.objects.values_list("state", flat=True))
    assert {"success"} <= states, s.log
    assert any(line.startswith("limits of") for line in s.log), s.log
    assert any(line.startswith("a sample") for line in s.log), s.log
