"""Tenants and what they may have: customers, memberships, plans, hosts, IP pools, audit.

Every tenant-owned model has a `visible_to(user)` queryset method: the one
gate through which views, serializers, filters and consumers see objects.
Another tenant's object is then simply absent, and answers 404 like a
missing one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.utils import timezone

from panel.hosting.choices import (
    WHOLE_TENANT_ROLES,
    AuditResultChoices,
    CustomerKindChoices,
    HostStateChoices,
    IPFamilyChoices,
    RoleChoices,
)

__all__ = [
    "ApiToken",
    "AuditLog",
    "Customer",
    "Host",
    "IPAddress",
    "IPPool",
    "Membership",
    "Plan",
    "PlanLimits",
    "PoolExhausted",
]


def _is_staff(user: Any) -> bool:
    return bool(getattr(user, "is_authenticated", False) and user.is_staff)


# --- plans ---------------------------------------------------------------------

# The limit fields a plan has and a customer may override, with what they mean.
PLAN_LIMIT_FIELDS: dict[str, str] = {
    "max_vservers": "vservers",
    "max_ipv4": "IPv4 addresses",
    "max_ipv6": "IPv6 addresses",
    "memory_mb": "MiB of memory (all vservers together)",
    "cpu_cores": "CPU cores (all vservers together)",
    "disk_gb": "GiB of disk (all vservers together)",
    "processes": "processes per vserver",
}


class PlanQuerySet(models.QuerySet["Plan"]):
    def visible_to(self, user: Any) -> PlanQuerySet:
        """Staff see every plan; others the plans of the customers they belong to."""
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(customers__memberships__user=user).distinct()


class Plan(models.Model):
    """What a customer may have, in total across their vservers (processes: per vserver)."""

    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=200, blank=True)
    max_vservers = models.PositiveIntegerField(default=1)
    max_ipv4 = models.PositiveIntegerField(default=1)
    max_ipv6 = models.PositiveIntegerField(default=1)
    memory_mb = models.PositiveIntegerField(default=512, validators=[MinValueValidator(16)])
    cpu_cores = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("1.00"),
                                    validators=[MinValueValidator(Decimal("0.05"))])
    disk_gb = models.PositiveIntegerField(default=10)
    processes = models.PositiveIntegerField(default=256, validators=[MinValueValidator(8)])
    allowed_caps = models.JSONField(default=list, blank=True,
                                    help_text="capabilities a customer may add, e.g. CAP_NET_RAW")
    allowed_flags = models.JSONField(default=list, blank=True,
                                     help_text="S_FLAGS a customer may set, e.g. fakeinit")
    console_allowed = models.BooleanField(default=True)
    templates = models.JSONField(default=list, blank=True,
                                 help_text="templates offered; empty: every template on the host")

    objects = PlanQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from hostagent import caps as capmod
        from hostagent import conf as confmod

        for cap in self.allowed_caps or []:
            if not isinstance(cap, str) or capmod.CAPS.get(cap) is None:
                raise ValidationError({"allowed_caps": f"unknown capability {cap!r}"})
            if capmod.CAPS[cap] in capmod.UNSAFE:
                raise ValidationError({"allowed_caps": f"{cap} is never offered to customers"})
        for flag in self.allowed_flags or []:
            if flag not in confmod.FLAGS:
                raise ValidationError({"allowed_flags": f"unknown flag {flag!r}"})


class PlanLimits:
    """A plan's limits with a customer's overrides applied."""

    def __init__(self, plan: Plan | None, overrides: dict[str, Any]) -> None:
        self.values: dict[str, Any] = {}
        for field in PLAN_LIMIT_FIELDS:
            base = getattr(plan, field) if plan is not None else 0
            over = overrides.get(field)
            self.values[field] = over if over is not None else base
        self.allowed_caps = list(plan.allowed_caps) if plan else []
        self.allowed_flags = list(plan.allowed_flags) if plan else []
        self.console_allowed = bool(plan.console_allowed) if plan else False

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


# --- customers ---------------------------------------------------------------------

class CustomerQuerySet(models.QuerySet["Customer"]):
    def visible_to(self, user: Any) -> CustomerQuerySet:
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(memberships__user=user).distinct()


class Customer(models.Model):
    """A tenant: a hosting customer or a classroom."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    kind = models.CharField(max_length=16, choices=CustomerKindChoices.choices,
                            default=CustomerKindChoices.KIND_HOSTING)
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="customers",
                             null=True, blank=True)
    # Per-customer overrides of the plan's limits (PLAN_LIMIT_FIELDS); None: the plan's.
    override_max_vservers = models.PositiveIntegerField(null=True, blank=True)
    override_max_ipv4 = models.PositiveIntegerField(null=True, blank=True)
    override_max_ipv6 = models.PositiveIntegerField(null=True, blank=True)
    override_memory_mb = models.PositiveIntegerField(null=True, blank=True)
    override_cpu_cores = models.DecimalField(max_digits=6, decimal_places=2, null=True,
                                             blank=True)
    override_disk_gb = models.PositiveIntegerField(null=True, blank=True)
    override_processes = models.PositiveIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)

    objects = CustomerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def limits(self) -> PlanLimits:
        overrides = {f: getattr(self, f"override_{f}") for f in PLAN_LIMIT_FIELDS}
        return PlanLimits(self.plan, overrides)

    def role_of(self, user: Any) -> str | None:
        if not getattr(user, "is_authenticated", False):
            return None
        m = self.memberships.filter(user=user).first()
        return m.role if m else None


class MembershipQuerySet(models.QuerySet["Membership"]):
    def visible_to(self, user: Any) -> MembershipQuerySet:
        """Staff see all; others the memberships of the customers they belong to."""
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        whole = Membership.objects.filter(user=user, role__in=WHOLE_TENANT_ROLES)
        return self.filter(Q(customer__in=whole.values("customer")) | Q(user=user)).distinct()


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="memberships")
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=RoleChoices.choices,
                            default=RoleChoices.ROLE_MEMBER)

    objects = MembershipQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "customer"],
                                               name="one_membership_per_user_and_customer")]

    def __str__(self) -> str:
        return f"{self.user} {self.role} of {self.customer}"


# --- hosts -----------------------------------------------------------------------

class HostQuerySet(models.QuerySet["Host"]):
    def enabled(self) -> HostQuerySet:
        return self.filter(state=HostStateChoices.STATE_ENABLED)


class Host(models.Model):
    """A node running hostagent; the panel reaches it on its agent socket."""

    name = models.CharField(max_length=64, unique=True)
    agent_socket = models.CharField(
        max_length=255, help_text="path of the agent's Unix socket, e.g. /run/vservers/agent.sock")
    state = models.CharField(max_length=16, choices=HostStateChoices.choices,
                             default=HostStateChoices.STATE_ENABLED)
    max_vservers = models.PositiveIntegerField(default=100)
    memory_mb = models.PositiveIntegerField(default=16384)
    cpu_cores = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("8"))
    disk_gb = models.PositiveIntegerField(default=500)
    iprootdev = models.CharField(max_length=15, blank=True,
                                 help_text="the device guests' addresses are aliases of")
    last_seen = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)

    objects = HostQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if not self.agent_socket.startswith("/") or "\0" in self.agent_socket \
                or "/../" in self.agent_socket + "/":
            raise ValidationError({"agent_socket": "an absolute path without '..'"})

    def client(self) -> Any:
        from hostagent.client import AgentClient

        return AgentClient(self.agent_socket, timeout=30)


# --- IP pools ----------------------------------------------------------------------

class PoolExhausted(Exception):
    """No free address left in any pool that fits."""


class IPPool(models.Model):
    """A range of addresses of one family, for one host (or any host when unset)."""

    name = models.CharField(max_length=64, unique=True)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="pools", null=True,
                             blank=True)
    family = models.PositiveSmallIntegerField(choices=IPFamilyChoices.choices)
    network = models.CharField(max_length=64, help_text="e.g. 192.0.2.0/24 or 2001:db8::/64")
    first = models.GenericIPAddressField(help_text="first address handed out")
    last = models.GenericIPAddressField(help_text="last address handed out")
    gateway = models.GenericIPAddressField(null=True, blank=True)
    reserved = models.JSONField(default=list, blank=True,
                                help_text="addresses in the range never handed out")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.network})"

    def net(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.network, strict=True)

    def clean(self) -> None:
        try:
            net = self.net()
        except ValueError as e:
            raise ValidationError({"network": str(e)}) from e
        if net.version != self.family:
            raise ValidationError({"network": f"not an IPv{self.family} network"})
        try:
            first, last = ipaddress.ip_address(self.first), ipaddress.ip_address(self.last)
        except ValueError as e:
            raise ValidationError({"first": str(e)}) from e
        for label, a in (("first", first), ("last", last)):
            if a not in net:
                raise ValidationError({label: f"{a} is not in {net}"})
        if int(first) > int(last):
            raise ValidationError({"last": "the range ends before it starts"})
        for r in self.reserved or []:
            try:
                ipaddress.ip_address(r)
            except ValueError as e:
                raise ValidationError({"reserved": str(e)}) from e

    def prefixlen(self) -> int:
        return self.net().prefixlen

    def allocate(self, vserver: Any) -> IPAddress:
        """Hand the lowest free address of the range to VSERVER.

        Never the same address twice, even under concurrent requests: the row
        is unique per (pool, address), so a second writer's insert fails and
        it takes the next free one.
        """
        skip = {str(ipaddress.ip_address(r)) for r in self.reserved or []}
        if self.gateway:
            skip.add(str(ipaddress.ip_address(self.gateway)))
        net = self.net()
        skip |= {str(net.network_address)}
        if net.version == 4:
            skip.add(str(net.broadcast_address))
        first, last = int(ipaddress.ip_address(self.first)), int(ipaddress.ip_address(self.last))
        for _attempt in range(20):
            taken = set(self.addresses.values_list("address", flat=True)) | skip
            candidate = None
            n = first
            while n <= last:
                text = str(ipaddress.ip_address(n))
                if text not in taken:
                    candidate = text
                    break
                n += 1
                if n - first > 1_000_000:  # a huge v6 range full of holes: stop looking
                    break
            if candidate is None:
                raise PoolExhausted(f"pool {self.name} has no free address")
            try:
                with transaction.atomic():
                    return IPAddress.objects.create(pool=self, address=candidate,
                                                    vserver=vserver)
            except IntegrityError:
                continue  # another request took it a moment ago
        raise PoolExhausted(f"pool {self.name}: too much contention, try again")


class IPAddress(models.Model):
    pool = models.ForeignKey(IPPool, on_delete=models.PROTECT, related_name="addresses")
    address = models.GenericIPAddressField()
    vserver = models.ForeignKey("guests.VServer", on_delete=models.SET_NULL, null=True,
                                blank=True, related_name="ips")
    allocated = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pool", "id"]
        constraints = [models.UniqueConstraint(fields=["pool", "address"],
                                               name="an_address_once_per_pool")]

    def __str__(self) -> str:
        return self.address

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version

    def iproot_token(self) -> str:
        """The address as NAME.conf's IPROOT wants it: IP/PREFIX."""
        return f"{self.address}/{self.pool.prefixlen()}"


# --- audit ---------------------------------------------------------------------------

class AuditLogQuerySet(models.QuerySet["AuditLog"]):
    def visible_to(self, user: Any) -> AuditLogQuerySet:
        if _is_staff(user):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        # A TA or a student reads what they did themselves, not their class's log.
        whole = Membership.objects.filter(user=user, role__in=WHOLE_TENANT_ROLES)
        return self.filter(Q(customer__in=whole.values("customer")) | Q(actor=user)).distinct()

    def update(self, **kwargs: Any) -> int:
        raise TypeError("the audit log is append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("the audit log is append-only")


class AuditLog(models.Model):
    """Who did what to which object of which tenant, from where, and how it went."""

    time = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True,
                              blank=True, related_name="+")
    actor_name = models.CharField(max_length=150, blank=True)
    customer = models.ForeignKey(Customer, on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="+")
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=64)
    result = models.CharField(max_length=16, choices=AuditResultChoices.choices,
                              default=AuditResultChoices.RESULT_OK)
    detail = models.JSONField(default=dict, blank=True)

    objects = AuditLogQuerySet.as_manager()

    class Meta:
        ordering = ["-time", "-id"]

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action} {self.target_repr}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not kwargs.get("force_insert"):
            raise TypeError("the audit log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise TypeError("the audit log is append-only")


# --- API tokens ------------------------------------------------------------------------

class ApiToken(models.Model):
    """A named API token of one user; only a hash of the secret is kept."""

    PREFIX_LEN = 8

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="api_tokens")
    name = models.CharField(max_length=64)
    prefix = models.CharField(max_length=PREFIX_LEN, db_index=True)
    digest = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField(null=True, blank=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @staticmethod
    def hash(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    @classmethod
    def issue(cls, user: Any, name: str, expires: Any = None) -> tuple[ApiToken, str]:
        """A new token and its secret, which is shown once and never stored."""
        secret = "vp_" + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=secret[3:3 + cls.PREFIX_LEN],
                                   digest=cls.hash(secret), expires=expires)
        return token, secret

    def is_valid(self) -> bool:
        now = timezone.now()
        return self.revoked is None and (self.expires is None or self.expires > now)
