"""What the live pages' consumers must hear at once: a logout, a change of access.

Both go to the group `user-ID` of every websocket of that user
(consumers.user_group); the consumers then check the session or the access
again and close, or stop showing, what is no longer the user's. The periodic
recheck (consumers.RECHECK) catches the rest, such as a session that expires.
Connected by GuestsConfig.ready().
"""

from __future__ import annotations

import logging
from typing import Any

from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save

from panel.guests import events
from panel.hosting.models import Membership

__all__ = ["connect"]

_LOG = logging.getLogger(__name__)


def _tell(user_id: int, message: dict[str, Any]) -> None:
    from panel.guests.consumers import user_group

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        events.send(layer, user_group(user_id), message)
    except Exception:  # a down channel layer must not fail a logout or a membership change
        _LOG.exception("telling user %s's websockets of %s", user_id, message["type"])


def _logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and key:
        _tell(user.pk, {"type": "session.ended", "session": key})


def _membership_changed(sender: Any, instance: Membership, **kwargs: Any) -> None:
    user_id = instance.user_id
    transaction.on_commit(lambda: _tell(user_id, {"type": "access.changed"}))


def _user_changed(sender: Any, instance: Any, update_fields: Any = None, **kwargs: Any) -> None:
    if kwargs.get("created") or (update_fields is not None
                                 and set(update_fields) <= {"last_login"}):
        return  # a login's own save changes nothing of what a page may show
    user_id = instance.pk
    transaction.on_commit(lambda: _tell(user_id, {"type": "access.changed"}))


def connect() -> None:
    user_logged_out.connect(_logged_out, dispatch_uid="vpanel-live-logout")
    post_save.connect(_membership_changed, sender=Membership, dispatch_uid="vpanel-live-m-save")
    post_delete.connect(_membership_changed, sender=Membership,
                        dispatch_uid="vpanel-live-m-delete")
    post_save.connect(_user_changed, sender=get_user_model(), dispatch_uid="vpanel-live-user")
