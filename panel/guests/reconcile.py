"""The reconciler: what the database says against what each host's agent says.

The agent is the truth about what runs; the database holds what should run
(desired_state) and what the panel last heard (status). They drift apart when
a guest is stopped on the host by hand, halts itself, a host reboots, an
agent is down, or the panel died half-way through an operation. One pass
asks every enabled or maintenance host for all its guests in one call
(GET /1.0/guests) and compares:

  missing     a vserver of the panel that its host does not have
  unmanaged   a guest on the host that the panel does not know
  status      the panel's status is not the host's state
  desired     it should run and is stopped (or should be stopped and runs)
  stale-op    an operation the panel still counts as under way, long after
              any agent operation would have ended (the panel was stopped)
  unreachable the host's agent does not answer

With repair (`manage.py reconcile --repair`):

  - every vserver's status, context and init pid are set from its agent
    (always safe: it is what the host says); a vserver its host lacks becomes
    'error', and every vserver of a silent host 'unknown', never 'stopped':
    a host we cannot see may well be running them;
  - a vserver that should run, is stopped, is not busy and has no operation
    under way is started through actions.system_start (an Operation and an
    audit row by 'system'); not on a host in maintenance, and not again
    within BACKOFF seconds of a start that failed;
  - a stale operation is marked failed;
  - nothing is ever deleted, on either side, and nothing running is ever
    stopped: a guest the panel does not know, or one running that should
    not, is reported for a person to decide.

Without repair nothing is written. Vservers with an operation under way are
compared but left alone: the operation will set their status when it ends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.utils import timezone

from hostagent import wire
from hostagent.client import AgentClient, AgentError
from panel.guests import actions, agent, events
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, VServer
from panel.hosting.choices import HostStateChoices
from panel.hosting.models import Host

__all__ = [
    "BACKOFF",
    "DRIFT_KINDS",
    "Drift",
    "HostReport",
    "reconcile",
    "reconcile_host",
    "refresh_host",
]

# An operation not updated for this long is no longer under way: the agent
# gives up on its own operations after agent.WAIT, so the panel's thread that
# followed it is gone (the panel was stopped or crashed).
STALE_AFTER = timedelta(seconds=agent.WAIT + 60)

# After a start by the reconciler failed, leave the vserver this long before
# the next try: a guest that cannot start is not retried every pass.
BACKOFF = timedelta(minutes=5)

# How long one pass waits for the starts it asked for before it reports.
START_WAIT = 120.0

AGENT_TIMEOUT = 10.0

DRIFT_MISSING = "missing"
DRIFT_UNMANAGED = "unmanaged"
DRIFT_STATUS = "status"
DRIFT_DESIRED = "desired"
DRIFT_STALE_OP = "stale-op"
DRIFT_UNREACHABLE = "unreachable"
DRIFT_KINDS = (DRIFT_MISSING, DRIFT_UNMANAGED, DRIFT_STATUS, DRIFT_DESIRED, DRIFT_STALE_OP,
               DRIFT_UNREACHABLE)

_PENDING = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)


@dataclass
class Drift:
    kind: str
    vserver: str  # its name ("" for the host itself)
    detail: str
    panel: str | None = None  # the panel's view (status, desired state)
    host: str | None = None  # the agent's view (state)
    repair: str = ""  # what was done (or, without repair, would be done); "" nothing


@dataclass
class HostReport:
    host: str
    socket: str
    reachable: bool
    error: str = ""
    guests: int = 0  # on the host
    vservers: int = 0  # in the panel
    busy: list[str] = field(default_factory=list)  # with an operation under way: left alone
    drift: list[Drift] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> datetime:
    return timezone.now()


def _update_status(vs: VServer, status: str, ctx: int | None, pid: int | None,
                   message: str) -> bool:
    """Write the status the host gave; True if anything changed (an event is sent then)."""
    if (vs.status, vs.context_id, vs.init_pid, vs.status_message) == (status, ctx, pid,
                                                                         message):
        return False
    VServer.objects.filter(pk=vs.pk).update(status=status, context_id=ctx, init_pid=pid,
                                            status_message=message[:500],
                                            status_updated=_now())
    events.vserver_changed(vs.pk)
    return True


def _in_flight(vs_ids: list[int]) -> dict[int, Operation]:
    """The operation under way on each of these vservers, if one is (the newest)."""
    fresh = _now() - STALE_AFTER
    out: dict[int, Operation] = {}
    for op in Operation.objects.filter(vserver_id__in=vs_ids, state__in=_PENDING,
                                       updated__gte=fresh).order_by("created", "id"):
        if op.vserver_id is not None:
            out[op.vserver_id] = op
    return out


def _stale_ops(host: Host, report: HostReport, repair: bool) -> None:
    stale = Operation.objects.filter(vserver__host=host, state__in=_PENDING,
                                     updated__lt=_now() - STALE_AFTER)
    for op in stale:
        since = f"{op.updated:%Y-%m-%d %H:%M:%S}"
        d = Drift(DRIFT_STALE_OP, op.vserver_name,
                  f"operation {op.pk} ({op.kind}) is {op.state} since {since}",
                  panel=op.state, repair="mark it failed")
        if repair:
            Operation.objects.filter(pk=op.pk, state__in=_PENDING).update(
                state=OperationStateChoices.STATE_FAILURE, updated=_now(),
                error="abandoned: no progress for over "
                      f"{int(STALE_AFTER.total_seconds())} s (was the panel stopped?)")
            d.repair = "marked failed"
            if op.vserver_id is not None:  # its page shows it under way until told
                events.vserver_changed(op.vserver_id)
        report.drift.append(d)


def _recent_failed_start(vs: VServer) -> Operation | None:
    return Operation.objects.filter(
        vserver=vs, kind=OperationKindChoices.KIND_START,
        state=OperationStateChoices.STATE_FAILURE, updated__gte=_now() - BACKOFF).first()


def _unreachable(host: Host, vservers: list[VServer], report: HostReport, error: str,
                 repair: bool) -> None:
    report.reachable, report.error = False, error
    d = Drift(DRIFT_UNREACHABLE, "", error, repair=f"mark its {len(vservers)} vservers unknown")
    report.drift.append(d)
    if not repair:
        return
    Host.objects.filter(pk=host.pk).update(last_error=error[:500])
    message = f"the host's agent does not answer: {error}"
    n = sum(_update_status(vs, VServerStatusChoices.STATUS_UNKNOWN, None, None, message)
            for vs in vservers)
    d.repair = f"{n} of its {len(vservers)} vservers newly marked unknown"


def refresh_host(host: Host, client: AgentClient) -> int:
    """Set HOST's vservers' status from what its agent says now; how many changed.

    The status part of a repair, and nothing else (no start, no stale
    operation): the agent event bridge (panel/guests/bridge.py) runs it each
    time its stream opens, so that what happened while it was not listening
    is not missed. As in a pass, a vserver with an operation under way is left
    to it, and one the host lacks becomes 'error'.
    """
    guests = {g.name: g for g in client.guests()}
    vservers = list(VServer.objects.filter(host=host))
    busy = _in_flight([vs.pk for vs in vservers])
    changed = 0
    for vs in vservers:
        if vs.pk in busy:
            continue
        info = guests.get(vs.name)
        if info is None:
            changed += _update_status(vs, VServerStatusChoices.STATUS_ERROR, None, None,
                                      "the host has no such vserver")
        else:
            changed += _update_status(vs, info.state, info.context, info.init_pid, "")
    Host.objects.filter(pk=host.pk).update(last_seen=_now(), last_error="")
    return changed


def reconcile_host(host: Host, *, repair: bool = False,
                   wait: float = START_WAIT) -> HostReport:
    """One host's pass: compare, and with REPAIR set right what is safe to."""
    vservers = list(VServer.objects.filter(host=host).select_related("customer")
                    .order_by("name"))
    report = HostReport(host=host.name, socket=host.agent_socket, reachable=True,
                        vservers=len(vservers))
    _stale_ops(host, report, repair)
    # A vserver with an operation under way is left to it: its status moves
    # through starting, stopping, ... and the operation reads the end state
    # back from the agent itself (agent.refresh_status).
    busy = _in_flight([vs.pk for vs in vservers])
    report.busy = sorted(vs.name for vs in vservers if vs.pk in busy)
    idle = [vs for vs in vservers if vs.pk not in busy]
    try:
        with AgentClient(host.agent_socket, timeout=AGENT_TIMEOUT) as client:
            guests = {g.name: g for g in client.guests()}
    except (AgentError, OSError, ValueError, httpx.HTTPError) as e:
        _unreachable(host, idle, report, str(e) or type(e).__name__, repair)
        return report
    report.guests = len(guests)
    if repair:
        Host.objects.filter(pk=host.pk).update(last_seen=_now(), last_error="")

    starts: list[tuple[Drift, Operation]] = []
    for vs in idle:
        info = guests.get(vs.name)
        if info is None:
            d = Drift(DRIFT_MISSING, vs.name, "the host has no such guest: left for a person "
                      "to delete in the panel or rebuild (reinstall)", panel=vs.status,
                      repair="status error")
            if repair:
                _update_status(vs, VServerStatusChoices.STATUS_ERROR, None, None,
                               "the host has no such vserver")
                d.repair = "status set to error"
            report.drift.append(d)
            continue

        now = (info.state, info.context, info.init_pid, "")
        if (vs.status, vs.context_id, vs.init_pid, vs.status_message) != now:
            # A new context or pid alone (a restart the panel did not see) is
            # set right without a line in the report; a different state is drift.
            d = Drift(DRIFT_STATUS, vs.name, f"the panel says {vs.status}, the host "
                      f"{info.state}", panel=vs.status, host=info.state,
                      repair=f"status {info.state}")
            if repair:
                _update_status(vs, *now)
                d.repair = f"status set to {info.state}"
            if info.state != vs.status:
                report.drift.append(d)

        if vs.desired_state == DesiredStateChoices.DESIRED_RUNNING \
                and info.state == wire.STATE_STOPPED:
            d = Drift(DRIFT_DESIRED, vs.name, "should run and is stopped",
                      panel=vs.desired_state, host=info.state)
            failed = _recent_failed_start(vs)
            if host.state != HostStateChoices.STATE_ENABLED:
                d.detail += f"; not started: the host is in {host.state}"
            elif failed is not None:
                wait_s = int((failed.updated + BACKOFF - _now()).total_seconds())
                d.detail += (f"; its start failed at {failed.updated:%H:%M:%S} "
                             f"({failed.error[:100]}), next try in {max(wait_s, 0)} s")
            else:
                d.repair = "start"
                if repair:
                    vs.refresh_from_db()
                    started = actions.system_start(
                        vs, reason="reconciler: its desired state is running, found stopped")
                    if started is None:
                        d.repair = "not started: busy, or no longer wanted running"
                    else:
                        d.repair = f"start (operation {started.pk})"
                        starts.append((d, started))
            report.drift.append(d)
        elif vs.desired_state == DesiredStateChoices.DESIRED_STOPPED \
                and info.state == wire.STATE_RUNNING:
            report.drift.append(Drift(
                DRIFT_DESIRED, vs.name, "should be stopped and runs: left running (stop it "
                "in the panel)", panel=vs.desired_state, host=info.state))

    known = {vs.name for vs in vservers}
    for name in sorted(set(guests) - known):
        g = guests[name]
        report.drift.append(Drift(DRIFT_UNMANAGED, name,
                                  f"on the host ({g.state}), unknown to the panel: left alone",
                                  host=g.state))

    if starts:
        _wait_for(starts, wait)
    return report


def _thread_alive(op_id: int) -> bool:
    """agent.dispatch's thread for OP_ID: it reads the status back after the
    operation is marked done, so a pass (and a one-shot command) waits for it."""
    return any(t.name == f"op-{op_id}" and t.is_alive() for t in threading.enumerate())


def _wait_for(starts: list[tuple[Drift, Operation]], wait: float) -> None:
    """Wait for the starts this pass asked for (they run in threads), note how each went."""
    deadline = time.monotonic() + wait
    pending = {op.pk: d for d, op in starts}
    while pending and time.monotonic() < deadline:
        for op in Operation.objects.filter(pk__in=list(pending)):
            if op.done and not _thread_alive(op.pk):
                d = pending.pop(op.pk)
                d.repair += f": {op.state}" + (f" ({op.error[:200]})" if op.error else "")
        if pending:
            time.sleep(0.1)
    for d in pending.values():
        d.repair += ": still under way"


def reconcile(*, repair: bool = False, hosts: list[str] | None = None,
              wait: float = START_WAIT) -> list[HostReport]:
    """One pass over every enabled or maintenance host (or the named ones)."""
    qs = Host.objects.filter(state__in=[HostStateChoices.STATE_ENABLED,
                                        HostStateChoices.STATE_MAINTENANCE])
    if hosts:
        qs = qs.filter(name__in=hosts)
    return [reconcile_host(h, repair=repair, wait=wait) for h in qs.order_by("name")]
