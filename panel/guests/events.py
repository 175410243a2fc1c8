"""A vserver's change, sent to whoever watches it (Channels groups).

Groups: `vserver-ID` (its page) and `customer-ID` (its tenant's dashboard),
and `staff` (every vserver). The message carries the vserver's state as the
database has it after the change; pages re-render their badge from it.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from panel.guests.models import VServer

__all__ = ["groups_of", "snapshot", "vserver_changed"]

_LOG = logging.getLogger(__name__)


def snapshot(vs: VServer) -> dict[str, Any]:
    return {"id": vs.pk, "name": vs.name, "status": vs.status,
            "status_display": vs.get_status_display(), "desired_state": vs.desired_state,
            "context_id": vs.context_id, "updated": vs.updated.isoformat()}


def groups_of(vs: VServer) -> list[str]:
    return [f"vserver-{vs.pk}", f"customer-{vs.customer_id}", "staff"]


def vserver_changed(vs_id: int) -> None:
    vs = VServer.objects.filter(pk=vs_id).first()
    layer = get_channel_layer()
    if layer is None:
        return
    if vs is None:
        message = {"type": "vserver.deleted", "vserver": {"id": vs_id}}
        groups = [f"vserver-{vs_id}", "staff"]
    else:
        message = {"type": "vserver.changed", "vserver": snapshot(vs)}
        groups = groups_of(vs)
    try:
        for g in groups:
            async_to_sync(layer.group_send)(g, message)
    except Exception:  # a down channel layer must not fail the action that changed the vserver
        _LOG.exception("sending the event of vserver %s", vs_id)
