"""Vservers and the operations run on them.

The database holds ownership, plans and the desired state; the agent on each
host is the truth about what runs. `status` is what the agent last said
(kept current by operations, events and the reconciler); a host that stops
answering turns its vservers' status to 'unknown', never 'stopped'.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from hostagent.names import NAME_RE
from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.hosting.choices import WHOLE_TENANT_ROLES
from panel.hosting.models import Customer, Host, Membership

__all__ = ["Operation", "SSHKey", "VServer"]


def _is_staff(user: Any) -> bool:
    return bool(getattr(user, "is_authenticated", False) and user.is_staff)


class VServerQuerySet(models.QuerySet["VServer"]):
    def visible_to(self, user: Any) -> VServerQuerySet:
        """The one tenant gate: staff see all; owners, admins, members and
        teachers their customers' vservers; a student the server of their own
        seat; a TA the servers of the students in their groups (panel/classroom)."""
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        whole = Membership.objects.filter(user=user, role__in=WHOLE_TENANT_ROLES)
        return self.filter(Q(customer__in=whole.values("customer"))
                           | Q(seat__user=user)
                           | Q(seat__group__assistants__membership__user=user)).distinct()


name_validator = RegexValidator(
    NAME_RE, "1 to 31 characters: a lower-case letter, then lower-case letters, digits and '-'")
hostname_validator = RegexValidator(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*\Z", "a host name: labels of letters, digits and '-', dot-separated")


class VServer(models.Model):
    name = models.CharField(max_length=31, validators=[name_validator])
    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="vservers")
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="vservers")
    template = models.CharField(max_length=31, blank=True,
                                help_text="template it was built from; empty: busybox")
    hostname = models.CharField(max_length=64, validators=[hostname_validator])
    description = models.CharField(max_length=200, blank=True)
    capabilities = models.JSONField(default=list, blank=True)
    flags = models.JSONField(default=list, blank=True)
    nice = models.SmallIntegerField(null=True, blank=True,
                                    validators=[MinValueValidator(-20), MaxValueValidator(19)])
    memory_mb = models.PositiveIntegerField(default=256, validators=[MinValueValidator(16)])
    cpu_cores = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("1.00"),
                                    validators=[MinValueValidator(Decimal("0.05"))])
    processes = models.PositiveIntegerField(default=128, validators=[MinValueValidator(8)])
    disk_gb = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    onboot = models.BooleanField(default=True)
    desired_state = models.CharField(max_length=16, choices=DesiredStateChoices.choices,
                                     default=DesiredStateChoices.DESIRED_RUNNING)
    status = models.CharField(max_length=16, choices=VServerStatusChoices.choices,
                              default=VServerStatusChoices.STATUS_BUILDING)
    context_id = models.PositiveIntegerField(null=True, blank=True)
    init_pid = models.PositiveIntegerField(null=True, blank=True)
    status_message = models.CharField(max_length=500, blank=True)
    status_updated = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    objects = VServerQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["host", "name"],
                                               name="vserver_name_unique_per_host")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from hostagent import caps as capmod
        from hostagent import conf as confmod

        for cap in self.capabilities or []:
            if not isinstance(cap, str) or capmod.CAPS.get(cap.lstrip("!")) is None:
                raise ValidationError({"capabilities": f"unknown capability {cap!r}"})
        for flag in self.flags or []:
            if flag not in confmod.FLAGS:
                raise ValidationError({"flags": f"unknown flag {flag!r}"})

    @property
    def busy(self) -> bool:
        from panel.guests.choices import BUSY_STATUSES

        return self.status in BUSY_STATUSES

    def limit_values(self) -> dict[str, str]:
        """The NAME.conf limit keys for this vserver's limits."""
        return {
            "MEMORY_LIMIT": f"{self.memory_mb}M",
            "CPU_MAX": f"{self.cpu_cores.normalize():f}",
            "PIDS_MAX": str(self.processes),
        }


class SSHKey(models.Model):
    vserver = models.ForeignKey(VServer, on_delete=models.CASCADE, related_name="ssh_keys")
    name = models.CharField(max_length=64)
    key = models.TextField(max_length=16384)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["vserver", "name"],
                                               name="ssh_key_name_unique_per_vserver")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        parts = self.key.strip().split()
        if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")) \
                or "\n" in self.key.strip():
            raise ValidationError({"key": "one OpenSSH public key line: TYPE BASE64 [COMMENT]"})
        import base64
        import binascii

        try:
            base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValidationError({"key": "the key's base64 part does not decode"}) from e


class OperationQuerySet(models.QuerySet["Operation"]):
    def visible_to(self, user: Any) -> OperationQuerySet:
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(vserver__in=VServer.objects.visible_to(user))


class Operation(models.Model):
    """One action on a vserver, with its progress and result; linked to the agent's."""

    vserver = models.ForeignKey(VServer, on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="operations")
    vserver_name = models.CharField(max_length=31)
    customer = models.ForeignKey(Customer, on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="+")
    kind = models.CharField(max_length=16, choices=OperationKindChoices.choices)
    state = models.CharField(max_length=16, choices=OperationStateChoices.choices,
                             default=OperationStateChoices.STATE_PENDING)
    progress = models.PositiveSmallIntegerField(default=0)
    message = models.CharField(max_length=500, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    agent_operation = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL,
                                   null=True, blank=True, related_name="+")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    objects = OperationQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.vserver_name} ({self.state})"

    @property
    def done(self) -> bool:
        return self.state in (OperationStateChoices.STATE_SUCCESS,
                              OperationStateChoices.STATE_FAILURE,
                              OperationStateChoices.STATE_CANCELLED)
