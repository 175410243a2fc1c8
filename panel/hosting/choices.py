"""Every status and kind of the hosting app, with its badge colour (STYLE.md)."""

from __future__ import annotations

from django.db import models

__all__ = [
    "MANAGING_ROLES",
    "SCOPED_ROLES",
    "WHOLE_TENANT_ROLES",
    "AuditResultChoices",
    "CustomerKindChoices",
    "HostStateChoices",
    "IPFamilyChoices",
    "RoleChoices",
]


class CustomerKindChoices(models.TextChoices):
    KIND_HOSTING = "hosting", "Hosting customer"
    KIND_CLASSROOM = "classroom", "Classroom"


class RoleChoices(models.TextChoices):
    ROLE_OWNER = "owner", "Owner"
    ROLE_ADMIN = "admin", "Admin"
    ROLE_MEMBER = "member", "Member"
    # A classroom's roles (panel/classroom): the teacher runs the class, a TA
    # the students of their own groups, a student their own server.
    ROLE_TEACHER = "teacher", "Teacher"
    ROLE_TA = "ta", "Teaching assistant"
    ROLE_STUDENT = "student", "Student"


# Roles that may change things (create, resize, delete); members may operate
# (start, stop, restart, console) and look.
MANAGING_ROLES = frozenset({RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN,
                            RoleChoices.ROLE_TEACHER})

# Roles that see every vserver of their customer. The others are scoped: a TA
# sees the servers of the students in their groups, a student their own.
WHOLE_TENANT_ROLES = frozenset({RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN,
                                RoleChoices.ROLE_MEMBER, RoleChoices.ROLE_TEACHER})
SCOPED_ROLES = frozenset({RoleChoices.ROLE_TA, RoleChoices.ROLE_STUDENT})


class HostStateChoices(models.TextChoices):
    STATE_ENABLED = "enabled", "Enabled"
    STATE_MAINTENANCE = "maintenance", "Maintenance"
    STATE_DISABLED = "disabled", "Disabled"


HOST_STATE_COLOURS = {
    HostStateChoices.STATE_ENABLED: "success",
    HostStateChoices.STATE_MAINTENANCE: "warning",
    HostStateChoices.STATE_DISABLED: "secondary",
}


class IPFamilyChoices(models.IntegerChoices):
    FAMILY_4 = 4, "IPv4"
    FAMILY_6 = 6, "IPv6"


class AuditResultChoices(models.TextChoices):
    RESULT_OK = "ok", "OK"
    RESULT_DENIED = "denied", "Denied"
    RESULT_ERROR = "error", "Error"


AUDIT_RESULT_COLOURS = {
    AuditResultChoices.RESULT_OK: "success",
    AuditResultChoices.RESULT_DENIED: "warning",
    AuditResultChoices.RESULT_ERROR: "danger",
}
