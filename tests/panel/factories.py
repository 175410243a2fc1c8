"""Factories of the panel's tests: plain functions, usable from fixtures and tests.

The API tests' world (tests/panel/conftest.py) is built from these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from panel.guests.choices import VServerStatusChoices
from panel.guests.models import VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership, Plan

__all__ = ["ROLES", "World", "make_plan", "make_user", "make_vserver", "unique"]

# The roles an API test acts as: 'other' is the owner of another tenant.
ROLES = ("anonymous", "other", "member", "admin", "owner", "staff")

_serial = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_serial)}"


@dataclass
class World:
    plan: Plan
    customer: Customer  # tenant A: the objects under test belong to it
    other_customer: Customer  # tenant B: its owner is the 'other' role
    host: Host
    pool4: IPPool
    pool6: IPPool
    users: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def user(self, role: str) -> Any:
        return self.users.get(role)

    def client(self, role: str) -> APIClient:
        """An API client acting as ROLE ('anonymous': not logged in)."""
        c = APIClient()
        if role != "anonymous":
            c.force_authenticate(self.users[role])
        return c

    def tenant_customer(self, name: str | None = None, plan: Plan | None = None) -> Customer:
        """Another customer of tenant A's users, each in the same role as in A."""
        slug = name or unique("cust-")
        c = Customer.objects.create(name=slug, slug=slug, plan=plan or self.plan)
        for r in (RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN, RoleChoices.ROLE_MEMBER):
            Membership.objects.create(customer=c, user=self.users[r], role=r)
        return c


def make_user(username: str, *, staff: bool = False) -> Any:
    return get_user_model().objects.create_user(username=username, password=None,
                                                is_staff=staff)


def make_plan(name: str | None = None, **limits: Any) -> Plan:
    values: dict[str, Any] = {
        "max_vservers": 50, "max_ipv4": 50, "max_ipv6": 50, "memory_mb": 65536,
        "cpu_cores": Decimal("64"), "disk_gb": 1000, "processes": 1024,
        "allowed_caps": ["CAP_NET_RAW"], "allowed_flags": [],
    }
    values.update(limits)
    return Plan.objects.create(name=name or unique("plan-"), **values)


def make_vserver(customer: Customer, host: Host, *, name: str | None = None, ipv4: int = 1,
                 ipv6: int = 0, status: str = VServerStatusChoices.STATUS_STOPPED,
                 **fields: Any) -> VServer:
    """A vserver straight in the database, with addresses from the host's pools."""
    name = name or unique("vs")
    vs = VServer.objects.create(name=name, customer=customer, host=host, hostname=name,
                                status=status, **fields)
    for family, count in ((IPFamilyChoices.FAMILY_4, ipv4), (IPFamilyChoices.FAMILY_6, ipv6)):
        pool = IPPool.objects.filter(family=family).order_by("name").first()
        for _ in range(count):
            assert pool is not None
            pool.allocate(vs)
    return vs
