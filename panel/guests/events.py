"""A vserver's change, sent to whoever watches it (Channels groups).

Groups: `vserver-ID` (its page) and `customer-ID` (its tenant's dashboard),
and `staff` (every vserver). The message carries the vserver's state as the
database has it after the change; pages re-render their badge from it.

`snapshot(vs)` is the one shape of a vserver's live state: what the events
carry, what the consumers send to the browser and what `state_for(user)`
(the dashboard's state, as a fresh fetch) is made of, so that the state a
page loaded plus the events it received equals a fresh fetch (STYLE.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from panel.guests.choices import (
    BUSY_STATUSES,
    OPERATION_COLOURS,
    STATUS_COLOURS,
    OperationStateChoices,
)
from panel.guests.models import Operation, VServer

__all__ = ["attach_loop", "groups_of", "send", "snapshot", "state_for", "vserver_changed"]

_LOG = logging.getLogger(__name__)

_IN_PROGRESS = (OperationStateChoices.STATE_PENDING, OperationStateChoices.STATE_RUNNING)


def _operation(op: Operation | None) -> dict[str, Any] | None:
    if op is None:
        return None
    return {"id": op.pk, "kind": op.kind, "kind_display": op.get_kind_display(),
            "state": op.state, "state_display": op.get_state_display(),
            "badge": OPERATION_COLOURS.get(op.state, "secondary"),
            "progress": op.progress, "message": op.message}


def current_operation(vs: VServer) -> Operation | None:
    """The newest operation under way on VS, if one is."""
    return (Operation.objects.filter(vserver_id=vs.pk, state__in=_IN_PROGRESS)
            .order_by("-created", "-id").first())


def snapshot(vs: VServer) -> dict[str, Any]:
    """VS's live state: status with its badge colour, the operation under way, limits."""
    return _snapshot(vs, current_operation(vs))


def _snapshot(vs: VServer, op: Operation | None) -> dict[str, Any]:
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
            "operation": _operation(op),
            "updated": vs.updated.isoformat()}


def state_for(user: Any) -> dict[int, dict[str, Any]]:
    """Every vserver USER may see, by id, as snapshots: the dashboard's live state."""
    vservers = list(VServer.objects.visible_to(user))
    ops: dict[int, Operation] = {}
    for op in (Operation.objects.filter(vserver__in=vservers, state__in=_IN_PROGRESS)
               .order_by("created", "id")):
        if op.vserver_id is not None:
            ops[op.vserver_id] = op  # the newest wins
    return {vs.pk: _snapshot(vs, ops.get(vs.pk)) for vs in vservers}


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
