"""The agent event bridge: each host's lifecycle and operation events, into the panel.

`manage.py agent_events` runs it beside the panel (`make run` does). For every
enabled or maintenance host it keeps one event stream open
(`GET /1.0/events?type=lifecycle,operation`, NDJSON, through
AgentClient.events) and, for each event about a vserver the panel knows:

  lifecycle  the vserver's status becomes the state the event gives
             (`metadata.state`: building, starting, stopping, ... as they
             begin, not when the panel's operation thread next looks); a
             running guest's context and init pid are read from the agent;
             a failed operation, a guest that exited or halted by itself, or
             one that did not start at boot leaves a status message;
  operation  the panel Operation following that agent operation (its
             `agent_operation` id) gets its message, and its state as far as
             the agent's says it: running; failed; done for the kinds that are
             one agent operation (start, stop, restart), which take its
             progress too (never lower).
             The panel's own thread, following the same operation, still
             records the result and reads the status back at the end.

Every change goes to the pages through events.vserver_changed. The agent is
the truth: the event says what it did, and nothing here asks it to do anything.

When a stream ends (the agent stopped, restarted, or dropped a listener that
fell behind) or cannot be opened, the bridge tries again after 1, 2, 4, ...
up to 30 seconds. Each time a stream opens, before its first event is read,
every vserver of the host gets its status from the agent afresh
(reconcile.refresh_host, the status part of a reconciler's repair): what
changed while nobody listened is not missed until the next reconciler pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from django.db import close_old_connections
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentClient, AgentError
from panel.guests import events, reconcile
from panel.guests.choices import (
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from panel.hosting.choices import HostStateChoices
from panel.hosting.models import Host

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "Bridge", "HostStream", "handle"]

_LOG = logging.getLogger(__name__)

BACKOFF_MIN = 1.0  # seconds before the first retry of a stream that ended or failed
BACKOFF_MAX = 30.0
STEADY = 60.0  # a stream open this long starts the next retry from BACKOFF_MIN again
RESCAN = 30.0  # seconds between two looks at the host list

STREAM_TYPES = (wire.TYPE_LIFECYCLE, wire.TYPE_OPERATION)

_IN_PROGRESS = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)

# Panel operations that are exactly one agent operation: that one's success is theirs.
_ONE_STEP = frozenset({OperationKindChoices.KIND_START, OperationKindChoices.KIND_STOP,
                       OperationKindChoices.KIND_RESTART})
# Panel operations that delete the guest on the host on purpose (and the row, or rebuild it).
_DELETING = (OperationKindChoices.KIND_DELETE, OperationKindChoices.KIND_REINSTALL)

_STOPPED_LIKE = frozenset({wire.STATE_STOPPED, wire.STATE_UNKNOWN,
                           VServerStatusChoices.STATUS_ERROR})

NO_SUCH_VSERVER = "the host has no such vserver"  # as agent.refresh_status says it


# --- one event ------------------------------------------------------------------------------

def handle(host: Host, event: wire.Event, client: AgentClient | None = None) -> bool:
    """Apply one agent EVENT of HOST to the panel; True if a vserver changed (and was sent).

    CLIENT, the host's agent, is asked for a running guest's context and init
    pid; without one they stay as they were.
    """
    if event.guest is None or event.type not in STREAM_TYPES:
        return False
    vs = VServer.objects.filter(host=host, name=event.guest).first()
    if vs is None:  # a guest the panel does not manage (the reconciler reports those)
        return False
    if event.type == wire.TYPE_LIFECYCLE:
        changed = _lifecycle(vs, event, client)
    else:
        changed = _operation(vs, event)
    if changed:
        events.vserver_changed(vs.pk)
    return changed


def _message(event: wire.Event) -> str:
    """The status message a lifecycle event leaves ("" for the ordinary ones)."""
    m = event.metadata
    if event.action == wire.EVENT_GUEST_OPERATION_FAILED:
        return f"{m.get('kind', 'an operation')} failed on the host: {m.get('error', '')}"
    if event.action == wire.EVENT_GUEST_EXITED:
        how = "halted from inside" if m.get("how") == "halt" else "its init ended on its own"
        return f"stopped: {how}"
    if event.action == wire.EVENT_ONBOOT_FAILED:
        return f"did not start at the host's boot: {m.get('error', '')}"
    return ""


def _lifecycle(vs: VServer, event: wire.Event, client: AgentClient | None) -> bool:
    state = event.metadata.get("state")
    if event.action == wire.EVENT_GUEST_DELETED:
        if Operation.objects.filter(vserver=vs, kind__in=_DELETING,
                                    state__in=_IN_PROGRESS).exists():
            return False  # the panel's own delete or reinstall: it deals with the row
        status, ctx, pid = VServerStatusChoices.STATUS_ERROR, None, None
        message = NO_SUCH_VSERVER
    elif isinstance(state, str) and state in wire.GUEST_STATES:
        status, ctx, pid, message = state, vs.context_id, vs.init_pid, _message(event)
        if state == wire.STATE_RUNNING and client is not None:
            try:
                info = client.guest(vs.name)
                status, ctx, pid = info.state, info.context, info.init_pid
            except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
                _LOG.warning("reading %s from its agent after %s: %s", vs.name, event.action, e)
        elif state in _STOPPED_LIKE:
            ctx = pid = None
    else:
        return False
    if (vs.status, vs.context_id, vs.init_pid, vs.status_message) == (status, ctx, pid,
                                                                         message):
        return False
    VServer.objects.filter(pk=vs.pk).update(status=status, context_id=ctx, init_pid=pid,
                                            status_message=message[:500],
                                            status_updated=timezone.now())
    return True


def _operation(vs: VServer, event: wire.Event) -> bool:
    try:
        theirs = wire.Operation.from_json(event.metadata)
    except wire.WireError as e:
        _LOG.warning("an operation event of %s that does not parse: %s", vs.name, e)
        return False
    op = Operation.objects.filter(vserver=vs, agent_operation=theirs.id,
                                  state__in=_IN_PROGRESS).first()
    if op is None:  # not the panel's, or already ended
        return False
    # A panel operation that is several of the agent's (create: build, then start)
    # has steps of its own, which its thread records; the agent's percent is one
    # step's. Progress only grows either way.
    updates: dict[str, Any] = {}
    if op.kind in _ONE_STEP:
        updates["progress"] = max(op.progress, min(theirs.progress, 99))
    if theirs.message and theirs.state == wire.OP_RUNNING:
        updates["message"] = theirs.message[:500]
    if theirs.state == wire.OP_RUNNING and op.state == OperationStateChoices.STATE_PENDING:
        updates["state"] = OperationStateChoices.STATE_RUNNING
    elif theirs.state in (wire.OP_FAILURE, wire.OP_CANCELLED):
        updates.update(state=OperationStateChoices.STATE_FAILURE,
                       error=(theirs.error or f"the agent's operation is {theirs.state}")[:5000])
    elif theirs.state == wire.OP_SUCCESS and op.kind in _ONE_STEP:
        updates.update(state=OperationStateChoices.STATE_SUCCESS, progress=100, message="done")
    if all(getattr(op, k) == v for k, v in updates.items()):
        return False
    Operation.objects.filter(pk=op.pk, state__in=_IN_PROGRESS).update(
        **updates, updated=timezone.now())
    return True


# --- one host's stream ------------------------------------------------------------------------

Say = Callable[[str], None]


class HostStream:
    """One host's event stream, in a thread of its own, opened again whenever it ends."""

    def __init__(self, host: Host, say: Say | None = None) -> None:
        self.host_id, self.name, self.socket = host.pk, host.name, host.agent_socket
        self.say = say or (lambda text: _LOG.info("%s", text))
        self.stop_event = threading.Event()
        self.opened = 0  # streams opened so far
        self.handled = 0  # events handled
        self.thread = threading.Thread(target=self.run, name=f"agent-events-{self.name}",
                                       daemon=True)

    def start(self) -> HostStream:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ask it to end: at once if it is waiting to retry, after the next event otherwise."""
        self.stop_event.set()

    def run(self) -> None:
        delay = BACKOFF_MIN
        while not self.stop_event.is_set():
            opened_at: float | None = None
            client = AgentClient(self.socket, timeout=10)

            def on_open(client: AgentClient = client) -> None:
                nonlocal opened_at
                opened_at = time.monotonic()
                self.opened += 1
                close_old_connections()
                host = Host.objects.get(pk=self.host_id)
                changed = reconcile.refresh_host(host, client)
                self.say(f"host {self.name}: listening ({self.socket}); "
                         f"{changed} status{'es' if changed != 1 else ''} set afresh")

            why = "the agent ended the stream"
            try:
                host = Host.objects.get(pk=self.host_id)
                for event in client.events(types=STREAM_TYPES, on_open=on_open):
                    if self.stop_event.is_set():
                        break
                    if event.type == wire.TYPE_DROPPED:
                        why = f"dropped by the agent: {event.metadata.get('reason')}"
                        break
                    self._handle(host, event, client)
            except Host.DoesNotExist:
                self.say(f"host {self.name}: no longer in the panel")
                return
            except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
                why = f"the agent does not answer: {e or type(e).__name__}"
            finally:
                client.close()
                close_old_connections()
            if self.stop_event.is_set():
                break
            if opened_at is not None and time.monotonic() - opened_at > STEADY:
                delay = BACKOFF_MIN
            self.say(f"host {self.name}: {why}; trying again in {delay:g} s")
            self.stop_event.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _handle(self, host: Host, event: wire.Event, client: AgentClient) -> None:
        close_old_connections()  # a long-lived thread: drop a connection past its age
        try:
            handle(host, event, client)
        except Exception:  # one bad event must not end the stream of every other
            _LOG.exception("handling %s %s of %s on %s", event.type, event.action,
                           event.guest, self.name)
        self.handled += 1


# --- every host ---------------------------------------------------------------------------------

class Bridge:
    """A HostStream per enabled or maintenance host (or the ones named), kept in step
    with the host list: a new host gets one, a disabled or removed host's ends."""

    def __init__(self, hosts: list[str] | None = None, say: Say | None = None,
                 rescan: float = RESCAN) -> None:
        self.names, self.say, self.rescan = hosts, say, rescan
        self.streams: dict[int, HostStream] = {}

    def sync(self) -> None:
        qs = Host.objects.filter(state__in=[HostStateChoices.STATE_ENABLED,
                                            HostStateChoices.STATE_MAINTENANCE])
        if self.names:
            qs = qs.filter(name__in=self.names)
        wanted = {h.pk: h for h in qs}
        for pk, stream in list(self.streams.items()):
            host = wanted.get(pk)
            if host is None or host.agent_socket != stream.socket \
                    or not stream.thread.is_alive():
                stream.stop()
                del self.streams[pk]
        for pk, host in wanted.items():
            if pk not in self.streams:
                self.streams[pk] = HostStream(host, self.say).start()

    def run(self, stop: threading.Event) -> None:
        """Until STOP is set: streams up, and the host list looked at every RESCAN s."""
        try:
            while not stop.is_set():
                close_old_connections()
                self.sync()
                if not self.streams and self.say is not None:
                    self.say("no enabled or maintenance host yet")
                stop.wait(self.rescan)
        finally:
            for stream in self.streams.values():
                stream.stop()
            close_old_connections()
