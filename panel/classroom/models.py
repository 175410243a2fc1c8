"""A class, its groups, its teaching assistants and its students' seats.

A class is a Customer of kind classroom (panel/hosting): its plan caps the
class as a whole, and its Classroom row says what each student's server gets
and which template every one is built from. A Seat is one student: their
panel login, their group and their server. Visibility follows the seat: a
student sees the server of their own seat, a TA those of their groups'
seats, the teacher all of the class (VServer.objects.visible_to).
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from hostagent.names import NAME_RE
from panel.guests.models import VServer
from panel.hosting.models import Customer, Membership

__all__ = ["ClassGroup", "Classroom", "Seat", "TeachingAssistant", "parse_hours"]

template_validator = RegexValidator(NAME_RE, "a template name: a lower-case letter, then "
                                              "lower-case letters, digits and '-'")
group_validator = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,31}\Z",
                                 "1 to 32 letters, digits, spaces, '_', '.' or '-'")

_HOURS_RE = re.compile(r"^(?P<days>[a-z,-]+)\s+(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d)$")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_hours(text: str) -> list[tuple[frozenset[int], dt.time, dt.time]]:
    """A schedule: one `DAYS HH:MM-HH:MM` a line, DAYS like `mon-fri`,
    `fri-mon` (round the weekend) or `mon,wed,sat`; blank lines and `#`
    comments skipped. An end before the start runs past midnight: DAYS are
    the days the range starts on, so `fri-sun 22:00-06:00` is Friday 22:00
    to Saturday 06:00, and so on to Monday 06:00 (autostop.in_hours reads it
    so). Raises ValueError naming the line."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        m = _HOURS_RE.match(line)
        if not m:
            raise ValueError(f"line {n}: write DAYS HH:MM-HH:MM, e.g. mon-fri 08:00-18:00")
        days: set[int] = set()
        for part in m["days"].split(","):
            a, _, b = part.partition("-")
            if a not in DAYS or (b and b not in DAYS):
                raise ValueError(f"line {n}: days are {', '.join(DAYS)}")
            i, j = DAYS.index(a), DAYS.index(b or a)
            days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        try:
            start = dt.time.fromisoformat(m["start"])
            end = dt.time.fromisoformat(m["end"]) if m["end"] != "24:00" else dt.time.max
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from e
        if end == start:
            raise ValueError(f"line {n}: the range is empty (the start is the end); "
                             "for a whole day write 00:00-24:00")
        out.append((frozenset(days), start, end))
    return out


class Classroom(models.Model):
    """What a class gives each student, and when its servers may run."""

    customer = models.OneToOneField(Customer, on_delete=models.CASCADE,
                                    related_name="classroom")
    template = models.CharField(max_length=31, validators=[template_validator],
                                help_text="the template every student's server is built from")
    seat_memory_mb = models.PositiveIntegerField(default=256, validators=[MinValueValidator(16)])
    seat_cpu_cores = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("0.5"),
                                         validators=[MinValueValidator(Decimal("0.05"))])
    seat_processes = models.PositiveIntegerField(default=128, validators=[MinValueValidator(8)])
    seat_disk_gb = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    seat_ipv4 = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(4)])
    # Auto-stop (panel/classroom/autostop.py). Empty hours: any time.
    hours = models.TextField(blank=True, help_text="allowed hours, one `mon-fri 08:00-18:00` "
                                                   "a line; empty: any time")
    idle_minutes = models.PositiveIntegerField(
        default=0, help_text="stop a server idle this long (no console, CPU under the "
                             "threshold); 0: never")
    idle_cpu_percent = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal("2"),
                                           validators=[MinValueValidator(Decimal("0")),
                                                       MaxValueValidator(Decimal("100"))])
    idle_warning_minutes = models.PositiveIntegerField(
        default=5, help_text="warn the student this long before an idle stop")

    def __str__(self) -> str:
        return str(self.customer)

    def clean(self) -> None:
        try:
            parse_hours(self.hours)
        except ValueError as e:
            raise ValidationError({"hours": str(e)}) from e

    def seat_limits(self) -> dict[str, Any]:
        return {"memory_mb": self.seat_memory_mb, "cpu_cores": self.seat_cpu_cores,
                "processes": self.seat_processes, "disk_gb": self.seat_disk_gb}


class ClassGroup(models.Model):
    """A group of students (a lab section); TAs are given groups."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="groups")
    name = models.CharField(max_length=32, validators=[group_validator])

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["classroom", "name"],
                                               name="group_name_unique_per_class")]

    def __str__(self) -> str:
        return self.name


class TeachingAssistant(models.Model):
    """A TA's group: the TA sees and operates its students' servers. Gone with
    the membership (a TA who leaves the class loses every group at once)."""

    membership = models.ForeignKey(Membership, on_delete=models.CASCADE,
                                   related_name="ta_groups")
    group = models.ForeignKey(ClassGroup, on_delete=models.CASCADE, related_name="assistants")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["membership", "group"],
                                               name="one_assignment_per_ta_and_group")]

    def clean(self) -> None:
        if self.membership.customer_id != self.group.classroom.customer_id:
            raise ValidationError("a TA can only be given groups of their own class")


class Seat(models.Model):
    """One student of a class: their login, group and server."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="seats")
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                                related_name="seat")
    full_name = models.CharField(max_length=150)
    email = models.EmailField()
    group = models.ForeignKey(ClassGroup, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="seats")
    ssh_key = models.TextField(max_length=16384, blank=True)
    vserver = models.OneToOneField(VServer, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="seat")
    # The root password's crypt hash, kept so that a reset to the template
    # gives the student back the password their teacher handed out (a copy of
    # what the server's own /etc/shadow holds; the password itself is never kept).
    root_password_hash = models.CharField(max_length=200, blank=True)
    # Auto-stop bookkeeping: when the server last showed activity, since when
    # it has looked idle, when the student was warned, and whether a teacher
    # started it outside the class's hours (then the schedule leaves it be).
    last_activity = models.DateTimeField(null=True, blank=True)
    idle_since = models.DateTimeField(null=True, blank=True)
    idle_warned = models.DateTimeField(null=True, blank=True)
    teacher_started = models.BooleanField(default=False)
    # The server's last CPU sample as its agent gave it (GET /1.0/stats): its
    # CPU seconds and its uptime then; the next pass of the auto-stop turns the
    # difference into a percentage. None: no sample yet (or it stopped since).
    cpu_seconds = models.FloatField(null=True, blank=True, editable=False)
    cpu_uptime = models.FloatField(null=True, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["user__username"]

    def __str__(self) -> str:
        return f"{self.user} in {self.classroom}"

    @property
    def username(self) -> str:
        return str(self.user.get_username())
