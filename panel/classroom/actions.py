"""Every change to a class: its roster, its students' servers and credentials,
and its end. As in panel/guests/actions.py, each is one transaction with an
audit row, refused with Denied (audited) when the actor's role does not allow
it, or ActionError saying what is wrong.

Who may do what: the class's teacher (and staff) everything; a TA the
servers and credentials of the students in their groups; a student their
own server (start, stop, restart, console, reset) and their own credentials.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.utils import timezone

from panel.classroom import roster as rostermod
from panel.classroom.hashers import GeneratedPasswordHasher
from panel.classroom.models import ClassGroup, Classroom, Seat, TeachingAssistant
from panel.guests import actions as gactions
from panel.guests.actions import ActionError, Actor, Denied, audit, records_denials
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.choices import CustomerKindChoices, RoleChoices
from panel.hosting.models import Customer, Membership, Plan

__all__ = [
    "Credential",
    "apply_roster",
    "assign_ta",
    "class_role",
    "create_class",
    "delete_class",
    "finish_deleted_classes",
    "remove_students",
    "remove_ta",
    "reset_credentials",
    "reset_seat",
    "seat_name",
]


GENERATED = GeneratedPasswordHasher.algorithm
ROSTER_KEY = "roster"  # the name of the SSH key a roster row gives a student's server


@dataclass(frozen=True)
class Credential:
    """What a teacher hands a student: shown once, never stored in the clear."""

    username: str
    full_name: str
    email: str
    vserver: str
    panel_password: str | None
    root_password: str | None

    CSV_HEADER = ("username", "full name", "email", "server", "panel password",
                  "root password")

    def row(self) -> tuple[str, ...]:
        return (self.username, self.full_name, self.email, self.vserver,
                self.panel_password or "", self.root_password or "")

    def to_json(self) -> dict[str, Any]:
        return {"username": self.username, "full_name": self.full_name, "email": self.email,
                "vserver": self.vserver, "panel_password": self.panel_password,
                "root_password": self.root_password}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Credential:
        return cls(**d)


def class_role(user: Any, classroom: Classroom) -> str | None:
    """USER's role in the class; staff count as its teacher."""
    if getattr(user, "is_staff", False):
        return RoleChoices.ROLE_TEACHER
    r = classroom.customer.role_of(user)
    if r in (RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN):
        return RoleChoices.ROLE_TEACHER  # a class's owner runs it
    return r


def _require_teacher(actor: Actor, classroom: Classroom, action: str, target: Any = None) -> None:
    r = class_role(actor.user, classroom)
    if r != RoleChoices.ROLE_TEACHER:
        raise Denied(f"only the class's teacher may {action.replace('-', ' ')}",
                     audit=(actor, classroom.customer, target, action))


def can_act_on_seat(user: Any, seat: Seat) -> bool:
    """The teacher, a TA of the seat's group, or the student themself."""
    r = class_role(user, seat.classroom)
    if r == RoleChoices.ROLE_TEACHER:
        return True
    if r == RoleChoices.ROLE_STUDENT:
        return bool(seat.user_id == user.pk)
    if r == RoleChoices.ROLE_TA:
        return seat.group_id is not None and seat.group.assistants.filter(
            membership__user=user).exists()
    return False


def _require_seat(actor: Actor, seat: Seat, action: str) -> None:
    if not can_act_on_seat(actor.user, seat):
        raise Denied(f"you may not {action.replace('-', ' ')} for {seat.username}",
                     audit=(actor, seat.classroom.customer, seat.vserver, action))


def seat_name(classroom: Classroom, username: str) -> str:
    """A server name for USERNAME's seat: CLASS-USER cut to 31 characters,
    made unique with a number when that is taken."""
    base = f"{classroom.customer.slug}-{username.replace('_', '-')}".lower()
    base = "".join(c for c in base if c.isalnum() or c == "-").strip("-")
    if not base[:1].isalpha():
        base = "s" + base
    base = base[:31].rstrip("-")
    name, n = base, 1
    while VServer.objects.filter(name=name).exists():
        n += 1
        suffix = f"-{n}"
        name = base[:31 - len(suffix)].rstrip("-") + suffix
    return name


# --- classes -------------------------------------------------------------------------

@records_denials
@transaction.atomic
def create_class(*, actor: Actor, name: str, slug: str, plan: Plan, template: str,
                 teacher: Any, **settings: Any) -> Classroom:
    """A new class (staff only): the tenant, its settings and its teacher."""
    if not getattr(actor.user, "is_staff", False):
        raise Denied("only staff may create a class", audit=(actor, None, None, "create-class"))
    customer = Customer(name=name, slug=slug, kind=CustomerKindChoices.KIND_CLASSROOM, plan=plan)
    customer.full_clean()
    customer.save()
    classroom = Classroom(customer=customer, template=template, **settings)
    classroom.full_clean()
    if plan.templates and template not in plan.templates:
        raise ActionError(f"template {template} is not offered by the plan {plan}", "template")
    classroom.save()
    Membership.objects.create(user=teacher, customer=customer, role=RoleChoices.ROLE_TEACHER)
    audit(actor, customer, customer, "create-class", template=template,
          teacher=teacher.get_username())
    return classroom


@records_denials
@transaction.atomic
def assign_ta(classroom: Classroom, *, actor: Actor, user: Any,
              groups: list[ClassGroup]) -> Membership:
    """Make USER a TA of the class for exactly GROUPS (its membership made
    if need be). A student, or a member in another role, cannot be made one."""
    _require_teacher(actor, classroom, "assign-ta")
    if hasattr(user, "seat"):
        raise ActionError(f"{user} is a student", "user")
    m = Membership.objects.filter(user=user, customer=classroom.customer).first()
    if m is None:
        m = Membership.objects.create(user=user, customer=classroom.customer,
                                      role=RoleChoices.ROLE_TA)
    elif m.role != RoleChoices.ROLE_TA:
        raise ActionError(f"{user} is already the class's {m.get_role_display().lower()}",
                          "user")
    if any(g.classroom_id != classroom.pk for g in groups):
        raise ActionError("a group of another class", "groups")
    TeachingAssistant.objects.filter(membership=m).exclude(group__in=groups).delete()
    for g in groups:
        TeachingAssistant.objects.get_or_create(membership=m, group=g)
    audit(actor, classroom.customer, user, "assign-ta", groups=[g.name for g in groups])
    return m


@records_denials
@transaction.atomic
def remove_ta(classroom: Classroom, *, actor: Actor, user: Any) -> None:
    """USER is no TA of the class any more (their groups go with the membership)."""
    _require_teacher(actor, classroom, "remove-ta")
    deleted, _ = Membership.objects.filter(user=user, customer=classroom.customer,
                                           role=RoleChoices.ROLE_TA).delete()
    if not deleted:
        raise ActionError(f"{user} is no TA of this class", "user")
    audit(actor, classroom.customer, user, "remove-ta")


# --- the roster ------------------------------------------------------------------------

def _new_root_password() -> tuple[str, str]:
    from panel.guests import agent

    password = gactions.generate_password()
    return password, agent.hash_password(password)


def _add_student(classroom: Classroom, row: rostermod.Row, actor: Actor) -> Credential:
    User = get_user_model()
    panel_password = gactions.generate_password()
    user = User(username=row.username, email=row.email,
                password=make_password(panel_password, hasher=GENERATED))
    user.save()
    Membership.objects.create(user=user, customer=classroom.customer,
                              role=RoleChoices.ROLE_STUDENT)
    group = None
    if row.group:
        group, _ = ClassGroup.objects.get_or_create(classroom=classroom, name=row.group)
    root_password, root_hash = _new_root_password()
    name = seat_name(classroom, row.username)
    keys = ((ROSTER_KEY, row.ssh_key),) if row.ssh_key else ()
    vs, _ = gactions.create_vserver(
        classroom.customer, actor=actor, name=name, hostname=name,
        template=classroom.template, ipv4=classroom.seat_ipv4, onboot=False,
        description=f"{row.full_name} ({row.username})", root_password_hash=root_hash,
        ssh_keys=keys, **classroom.seat_limits())
    Seat.objects.create(classroom=classroom, user=user, full_name=row.full_name,
                        email=row.email, group=group, ssh_key=row.ssh_key, vserver=vs,
                        root_password_hash=root_hash)
    audit(actor, classroom.customer, vs, "add-student", username=row.username)
    return Credential(row.username, row.full_name, row.email, name, panel_password,
                      root_password)


def _update_student(classroom: Classroom, row: rostermod.Row, actor: Actor) -> None:
    seat = Seat.objects.select_related("user", "group").get(classroom=classroom,
                                                            user__username=row.username)
    group = None
    if row.group:
        group, _ = ClassGroup.objects.get_or_create(classroom=classroom, name=row.group)
    Seat.objects.filter(pk=seat.pk).update(full_name=row.full_name, email=row.email,
                                           group=group, ssh_key=row.ssh_key)
    get_user_model().objects.filter(pk=seat.user_id).update(email=row.email)
    vs = seat.vserver
    if "ssh key" in row.changes and vs is not None:
        # The roster's key replaces the one it gave before, on the server too.
        SSHKey.objects.filter(vserver=vs, name=ROSTER_KEY).delete()
        if row.ssh_key:
            key = SSHKey(vserver=vs, name=ROSTER_KEY, key=row.ssh_key.strip())
            key.full_clean()
            key.save()
        if vs.status == VServerStatusChoices.STATUS_RUNNING:
            gactions._operation(vs, OperationKindChoices.KIND_SSH_KEYS, actor)
    audit(actor, classroom.customer, vs, "update-student", username=row.username,
          changes=row.changes)


@records_denials
def apply_roster(classroom: Classroom, data: bytes, *, actor: Actor) -> tuple[
        rostermod.Preview, list[Credential]]:
    """Add the roster's new students and update the changed ones; remove none.

    Read again here (the class may have changed since the preview was shown);
    each student in a transaction of their own, so that a failure (a host
    without room) leaves those before it done and the roster can be applied
    again: rows already done are then `keep`.
    """
    _require_teacher(actor, classroom, "import-roster")
    preview = rostermod.preview(classroom, data)
    made: list[Credential] = []
    for row in preview.ok_rows:
        if row.action == "keep":
            continue
        try:
            with transaction.atomic():
                if row.action == "add":
                    made.append(_add_student(classroom, row, actor))
                else:
                    _update_student(classroom, row, actor)
        except ActionError as e:
            row.errors.append(e.message)
            row.action = ""
    audit(actor, classroom.customer, classroom.customer, "import-roster",
          added=preview.count("add"), updated=preview.count("update"),
          errors=preview.error_count)
    return preview, made


@records_denials
def remove_students(classroom: Classroom, usernames: list[str], *, actor: Actor,
                    confirm: str) -> int:
    """Delete these students' servers and accounts; CONFIRM must be `remove`."""
    _require_teacher(actor, classroom, "remove-students")
    if confirm != "remove":
        raise ActionError("type remove to confirm", "confirm")
    seats = list(Seat.objects.filter(classroom=classroom, user__username__in=usernames)
                 .select_related("user", "vserver"))
    for seat in seats:
        with transaction.atomic():
            _drop_seat(seat, actor)
    return len(seats)


def _drop_seat(seat: Seat, actor: Actor) -> None:
    """Delete the seat's server (an agent operation) and the student's account."""
    vs = seat.vserver
    if vs is not None:
        VServer.objects.filter(pk=vs.pk).update(desired_state=DesiredStateChoices.DESIRED_STOPPED)
        audit(actor, seat.classroom.customer, vs, "delete-vserver", reason="student removed")
        gactions._operation(vs, OperationKindChoices.KIND_DELETE, actor)
        gactions._set_status(vs, VServerStatusChoices.STATUS_DELETING)
    audit(actor, seat.classroom.customer, seat.user, "remove-student", username=seat.username)
    seat.user.delete()  # the seat and the membership go with it


# --- a student's server ----------------------------------------------------------------

@records_denials
@transaction.atomic
def reset_seat(seat: Seat, *, actor: Actor, keep_home: bool, confirm: str) -> Operation:
    """Put the seat's server back to the class's template, keeping /home or not.

    CONFIRM must be the server's name. The server comes back up (if it was
    meant to run) with the same root password and SSH key."""
    seat = Seat.objects.select_related("classroom__customer", "vserver", "user").get(pk=seat.pk)
    _require_seat(actor, seat, "reset-server")
    vs = seat.vserver
    if vs is None:
        raise ActionError(f"{seat.username} has no server", "confirm")
    vs = VServer.objects.select_for_update().get(pk=vs.pk)
    if vs.busy:
        raise ActionError(f"{vs.name} is {vs.get_status_display().lower()}: wait until it "
                          "has finished", "status")
    if confirm != vs.name:
        raise ActionError(f"type the server's name ({vs.name}) to confirm the reset", "confirm")
    keep = ["/home"] if keep_home else []
    audit(actor, seat.classroom.customer, vs, "reset-server", keep=keep)
    extra: dict[str, Any] = {"keep": keep}
    if seat.root_password_hash:
        extra["password_hash"] = seat.root_password_hash
    op = gactions._operation(vs, OperationKindChoices.KIND_RESET, actor, **extra)
    gactions._set_status(vs, VServerStatusChoices.STATUS_BUILDING)
    return op


@records_denials
@transaction.atomic
def reset_credentials(seat: Seat, *, actor: Actor, panel: bool = True,
                      root: bool = True) -> Credential:
    """New generated passwords for the student's panel login and/or their
    server's root; returned once, to show once."""
    seat = Seat.objects.select_related("classroom__customer", "vserver", "user").get(pk=seat.pk)
    _require_seat(actor, seat, "reset-credentials")
    panel_password = root_password = None
    if panel:
        panel_password = gactions.generate_password()
        seat.user.password = make_password(panel_password, hasher=GENERATED)
        seat.user.save(update_fields=["password"])
    vs = seat.vserver
    if root and vs is not None:
        root_password, root_hash = _new_root_password()
        Seat.objects.filter(pk=seat.pk).update(root_password_hash=root_hash)
        if vs.status == VServerStatusChoices.STATUS_RUNNING:
            gactions._operation(vs, OperationKindChoices.KIND_RESET_PASSWORD, actor,
                                password_hash=root_hash)
        # A stopped server gets it at its next reset; until then say so.
    audit(actor, seat.classroom.customer, seat.user, "reset-credentials",
          username=seat.username, panel=panel, root=root)
    return Credential(seat.username, seat.full_name, seat.email, vs.name if vs else "",
                      panel_password, root_password)


# --- the end of term ----------------------------------------------------------------------

@records_denials
def delete_class(classroom: Classroom, *, actor: Actor, confirm: str) -> int:
    """End of term: stop and delete every server of the class and every
    student's account; CONFIRM must be the class's slug. The class itself
    goes once its last server is deleted (finish_deleted_classes), its
    addresses with the servers. Returns how many servers are being deleted."""
    _require_teacher(actor, classroom, "delete-class")
    customer = classroom.customer
    if confirm != customer.slug:
        raise ActionError(f"type the class's short name ({customer.slug}) to confirm", "confirm")
    with transaction.atomic():
        Customer.objects.filter(pk=customer.pk).update(is_active=False)
        seats = list(Seat.objects.filter(classroom=classroom).select_related("user", "vserver"))
        for seat in seats:
            _drop_seat(seat, actor)
        others = list(VServer.objects.filter(customer=customer).exclude(
            status=VServerStatusChoices.STATUS_DELETING))
        for vs in others:  # servers a teacher made by hand
            audit(actor, customer, vs, "delete-vserver", reason="class deleted")
            gactions._operation(vs, OperationKindChoices.KIND_DELETE, actor)
            gactions._set_status(vs, VServerStatusChoices.STATUS_DELETING)
        audit(actor, customer, customer, "delete-class", servers=len(seats) + len(others),
              students=len(seats))
    finish_deleted_classes()
    return len(seats) + len(others)


def finish_deleted_classes(now: dt.datetime | None = None) -> list[str]:
    """Remove deleted classes whose servers are all gone; their names."""
    done = []
    for customer in Customer.objects.filter(kind=CustomerKindChoices.KIND_CLASSROOM,
                                            is_active=False, classroom__isnull=False):
        if customer.vservers.exists():
            continue
        with transaction.atomic():
            audit(Actor(None), None, customer, "class-removed", slug=customer.slug,
                  at=(now or timezone.now()).isoformat())
            customer.memberships.all().delete()
            customer.delete()
        done.append(customer.slug)
    return done
