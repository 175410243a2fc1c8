"""Teachers' own starts do not count against a class's hours.

A start (or restart) of a student's server by the class's teacher, or by
staff, outside the class's allowed hours sets its Seat.teacher_started: the
auto-stop (panel/classroom/autostop.py) then leaves it running outside the
hours. Any stop of the server uses that up (and so does the auto-stop when it
finds the server stopped). Anybody's start or restart also counts as use of
the server: its idle count and warning are cleared. Read on the Operation each action records, so
that every way to start a server (page, API, bulk) is covered by one hook.
Connected by ClassroomConfig.ready().
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_save
from django.utils import timezone

from panel.guests.choices import OperationKindChoices
from panel.guests.models import Operation

__all__ = ["connect"]

_STARTS = (OperationKindChoices.KIND_START, OperationKindChoices.KIND_RESTART)


def _operation_created(sender: Any, instance: Operation, created: bool = False,
                       **kwargs: Any) -> None:
    if not created or instance.vserver_id is None:
        return
    from panel.classroom import autostop
    from panel.classroom.actions import class_role
    from panel.classroom.models import Seat
    from panel.hosting.choices import RoleChoices

    if instance.kind == OperationKindChoices.KIND_STOP:
        Seat.objects.filter(vserver_id=instance.vserver_id, teacher_started=True).update(
            teacher_started=False)
        return
    if instance.kind not in _STARTS or instance.created_by is None:
        return
    seat = Seat.objects.filter(vserver_id=instance.vserver_id).select_related(
        "classroom__customer").first()
    if seat is None:
        return
    when = instance.created or timezone.now()
    # Somebody's start or restart is use: the idle count starts again.
    changes: dict[str, object] = {"idle_since": None, "idle_warned": None,
                                  "last_activity": when}
    if class_role(instance.created_by, seat.classroom) == RoleChoices.ROLE_TEACHER:
        policy = autostop.policy_of(seat.classroom)
        if not autostop.in_hours(policy.hours, when, policy.tz):
            changes["teacher_started"] = True
    Seat.objects.filter(pk=seat.pk).update(**changes)


def connect() -> None:
    post_save.connect(_operation_created, sender=Operation,
                      dispatch_uid="vpanel-classroom-teacher-start")
