"""Fixtures of the panel's tests.

Each section belongs to the tests named in its heading; add yours in a section
of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from panel.guests.models import VServer
from panel.hosting.choices import IPFamilyChoices, RoleChoices
from panel.hosting.models import Customer, Host, IPPool, Membership
from tests.panel.factories import World, make_plan, make_user, make_vserver

# =====================================================================================
# API tests (tests/panel/api/): two tenants, a user in each role, a host, two pools.
# Vservers are made directly in the database (status 'stopped', IPs from the pools):
# these tests exercise the API, and no agent runs (its work starts on commit, which
# plain `db` tests never reach).
# =====================================================================================

@pytest.fixture
def world(db: None) -> World:
    plan = make_plan("standard")
    a = Customer.objects.create(name="Acme", slug="acme", plan=plan)
    b = Customer.objects.create(name="Bobco", slug="bobco", plan=plan)
    users = {
        "owner": make_user("alice"),
        "admin": make_user("adam"),
        "member": make_user("mia"),
        "other": make_user("bob"),
        "staff": make_user("root-staff", staff=True),
    }
    for r in (RoleChoices.ROLE_OWNER, RoleChoices.ROLE_ADMIN, RoleChoices.ROLE_MEMBER):
        Membership.objects.create(customer=a, user=users[r], role=r)
    Membership.objects.create(customer=b, user=users["other"], role=RoleChoices.ROLE_OWNER)
    host = Host.objects.create(name="node1", agent_socket="/run/vpanel-test/agent.sock",
                               memory_mb=1_000_000, cpu_cores=Decimal("512"),
                               disk_gb=100_000, max_vservers=1000)
    pool4 = IPPool.objects.create(name="v4", family=IPFamilyChoices.FAMILY_4,
                                  network="198.18.2.0/24", first="198.18.2.10",
                                  last="198.18.2.250", gateway="198.18.2.1")
    pool6 = IPPool.objects.create(name="v6", family=IPFamilyChoices.FAMILY_6,
                                  network="fd00:db8::/64", first="fd00:db8::10",
                                  last="fd00:db8::ffff", gateway="fd00:db8::1")
    return World(plan=plan, customer=a, other_customer=b, host=host, pool4=pool4, pool6=pool6,
                 users=users)


@pytest.fixture
def vserver_of(world: World) -> Callable[..., VServer]:
    """Make a vserver of tenant A (or of the customer given)."""

    def make(customer: Customer | None = None, **kw: Any) -> VServer:
        return make_vserver(customer or world.customer, world.host, **kw)

    return make

# ============================ end of the API tests' section ============================
