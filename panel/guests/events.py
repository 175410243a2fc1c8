"""A vserver's change, sent to whoever watches it (Channels groups).

Groups: `vserver-ID` (its page) and `customer-ID` (its tenant's dashboard),
and `staff` (every vserver). The message carries the vserver's state as the
database has it after the change; pages re-render their badge from it.

`snapshot(vs)` is the one shape of a vserver's live state: what the events
carry, what the consumers send to the browser and what `state_for(user)`
(the dashboard's state, as a fresh fetch) is made of, so that the state a
page loaded plus the events it received equals a fresh fetch (STYLE.md).
A vserver's page is sent `detail(vs)`: the snapshot and the vserver's recent
operations (its "Recent operations" table). A dashboard is also sent the
usage bars of its user's customers (`plans_for(user)`, plan_usage.plan_of).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import dateformat, timezone
from django.utils.text import Truncator

from panel.guests.choices import (
    BUSY_STATUSES,
    OPERATION_COLOURS,
    STATUS_COLOURS,
    OperationStateChoices,
)
from panel.guests.models import Operation, VServer
from panel.guests.plan_usage import customers_of, plan_of

__all__ = ["DASHBOARD_OPERATIONS", "RECENT_OPERATIONS", "attach_loop", "detail", "groups_of",
           "operation", "plans_for", "recent_operations", "send", "snapshot", "snapshots",
           "state_for", "vserver_changed"]

_LOG = logging.getLogger(__name__)

_IN_PROGRESS = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)

RECENT_OPERATIONS = 10  # rows of a vserver page's "Recent operations"
DASHBOARD_OPERATIONS = 50  # rows of the dashboard's "Operations in progress"


def operation(op: Operation) -> dict[str, Any]:
    """OP as the pages show it (templates/includes/operations.html, static/js/live.js)."""
    return {"id": op.pk, "vserver": op.vserver_id, "vserver_name": op.vserver_name,
            "kind": op.kind, "kind_display": op.get_kind_display(),
            "state": op.state, "state_display": op.get_state_display(),
            "badge": OPERATION_COLOURS.get(op.state, "secondary"),
            "progress": op.progress, "message": op.message,
            "error": Truncator(op.error).chars(200) if op.error else "", "done": op.done,
            "created": op.created.isoformat(),
            # As the template prints it: the panel's time zone, not the browser's.
            "created_display": dateformat.format(timezone.localtime(op.created),
                                                 "Y-m-d H:i:s")}


def _in_progress(vs: VServer) -> list[Operation]:
    return list(Operation.objects.filter(vserver_id=vs.pk, state__in=_IN_PROGRESS)
                .order_by("-created", "-id"))


def snapshot(vs: VServer) -> dict[str, Any]:
    """VS's live state: status with its badge colour, the operations under way, limits."""
    return _snapshot(vs, _in_progress(vs))


def _snapshot(vs: VServer, ops: list[Operation]) -> dict[str, Any]:
    """OPS: VS's operations under way, the newest first."""
    shown = [operation(op) for op in ops]
    return {"id": vs.pk, "name": vs.name, "customer": vs.customer_id,
            "hostname": vs.hostname, "status": vs.status,
            "status_display": vs.get_status_display(),
            "badge": STATUS_COLOURS.get(vs.status, "secondary"),
            "busy": vs.status in BUSY_STATUSES, "desired_state": vs.desired_state,
            "status_message": vs.status_message,
            "status_updated": vs.status_updated.isoformat() if vs.status_updated else None,
            "context_id": vs.context_id, "init_pid": vs.init_pid,
            "memory_mb": vs.memory_mb, "cpu_cores": f"{vs.cpu_cores.normalize():f}",
            "disk_gb": vs.disk_gb, "processes": vs.processes,
            # The newest under way (what a badge's neighbour shows), and all of them.
            "operation": shown[0] if shown else None, "operations": shown,
            "updated": vs.updated.isoformat()}


def detail(vs: VServer) -> dict[str, Any]:
    """What a vserver's page shows live: the snapshot, and its recent operations (any
    state, the newest first), as the page's table has them."""
    return {**snapshot(vs), "recent": recent_operations(vs.pk)}


def recent_operations(vs_id: int) -> list[dict[str, Any]]:
    return [operation(op) for op in Operation.objects.filter(vserver_id=vs_id)
            .order_by("-created", "-id")[:RECENT_OPERATIONS]]


def state_for(user: Any) -> dict[int, dict[str, Any]]:
    """Every vserver USER may see, by id, as snapshots: the dashboard's live state."""
    return snapshots(list(VServer.objects.visible_to(user)))


def snapshots(vservers: list[VServer]) -> dict[int, dict[str, Any]]:
    """VSERVERS' snapshots by id: their operations under way read in one query for all."""
    ops: dict[int, list[Operation]] = {}
    for op in (Operation.objects.filter(vserver__in=vservers, state__in=_IN_PROGRESS)
               .order_by("-created", "-id")):
        if op.vserver_id is not None:
            ops.setdefault(op.vserver_id, []).append(op)
    return {vs.pk: _snapshot(vs, ops.get(vs.pk, [])) for vs in vservers}


def plans_for(user: Any) -> dict[int, dict[str, Any]]:
    """The usage bars of every customer USER's dashboard shows, by customer id."""
    return {c.pk: plan_of(c) for c in customers_of(user)}


def groups_of(vs: VServer) -> list[str]:
    return [f"vserver-{vs.pk}", f"customer-{vs.customer_id}", "staff"]


def vserver_changed(vs_id: int, *, customer_id: int | None = None) -> None:
    """Tell VS_ID's watchers it changed (or, gone from the database, that it was deleted).

    CUSTOMER_ID: its customer's, for a deleted vserver (its dashboard is told too).
    Each message has a timestamp (`ts`) and an id of its own (`eid`): the
    consumers read the vserver again once per message and process, not once
    per page watching it.
    """
    vs = VServer.objects.filter(pk=vs_id).first()
    layer = get_channel_layer()
    if layer is None:
        return
    stamp = {"ts": time.time(), "eid": uuid.uuid4().hex}
    if vs is None:
        message = {"type": "vserver.deleted", "vserver": {"id": vs_id, "customer": customer_id},
                   **stamp}
        groups = [f"vserver-{vs_id}", "staff"]
        if customer_id is not None:
            groups.append(f"customer-{customer_id}")
    else:
        message = {"type": "vserver.changed", "vserver": snapshot(vs), **stamp}
        groups = groups_of(vs)
    try:
        for g in groups:
            send(layer, g, message)
    except Exception:  # a down channel layer must not fail the action that changed the vserver
        _LOG.exception("sending the event of vserver %s", vs_id)


# The event loop of this process's websocket consumers, once one has connected.
_LIVE_LOOP: asyncio.AbstractEventLoop | None = None


def attach_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The consumers' loop (Daphne's): events from other threads are sent in it."""
    global _LIVE_LOOP
    _LIVE_LOOP = loop


def send(layer: Any, group: str, message: dict[str, Any]) -> None:
    """group_send from sync code, in whichever thread.

    From a plain thread (an operation's, the bridge's) async_to_sync would run
    the send in an event loop of its own, and the in-memory layer's queues
    belong to the consumers' loop: a put from another loop is not thread-safe
    and may sit unseen until something else wakes that loop. So the send is
    handed to the consumers' loop when this process has one running.
    """
    loop = _LIVE_LOOP
    if loop is not None and loop.is_running():
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            asyncio.run_coroutine_threadsafe(layer.group_send(group, message), loop).result(
                timeout=SEND_TIMEOUT)
            return
    async_to_sync(layer.group_send)(group, message)


SEND_TIMEOUT = 10.0
