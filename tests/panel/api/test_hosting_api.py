"""The hosting app's endpoints through the generic API test case."""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from panel.hosting.choices import HostStateChoices, IPFamilyChoices, RoleChoices
from panel.hosting.models import (
    AuditLog,
    Customer,
    Host,
    IPAddress,
    IPPool,
    Membership,
    Plan,
)
from tests.panel.api.base import STAFF, TENANT_ROLES, APIViewTestCase
from tests.panel.factories import World, make_plan, make_user, make_vserver, unique

OWNERS = frozenset({"owner", "staff"})


class TestCustomerAPI(APIViewTestCase):
    basename = "customer"
    model = Customer
    create_roles = update_roles = delete_roles = STAFF
    create_other_status = 403
    search_term = "cust-"

    def make_object(self, world: World) -> Customer:
        c = world.tenant_customer()
        make_vserver(c, world.host)  # so that usage has something to count
        return c

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"name": "Newco", "slug": "newco", "plan": world.plan.pk,
                "override_memory_mb": 2048}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"name": "Renamed", "override_max_vservers": 7}

    def make_deletable(self, world: World) -> Customer:
        return world.tenant_customer()  # without vservers, which would protect it

    def assert_created(self, world: World, response: Any) -> None:
        body = response.json()
        assert body["limits"]["memory_mb"] == 2048  # the override over the plan's
        assert body["limits"]["max_vservers"] == world.plan.max_vservers
        assert body["usage"]["max_vservers"] == 0

    def assert_updated(self, world: World, obj: Any, response: Any) -> None:
        assert response.json()["limits"]["max_vservers"] == 7
        assert Customer.objects.get(pk=obj.pk).name == "Renamed"



class TestMembershipAPI(APIViewTestCase):
    basename = "membership"
    model = Membership
    create_roles = update_roles = delete_roles = OWNERS
    search_term = "user"

    def make_object(self, world: World) -> Membership:
        return Membership.objects.create(customer=world.customer, user=make_user(unique("user")),
                                         role=RoleChoices.ROLE_MEMBER)

    def create_payload(self, world: World) -> dict[str, Any]:
        make_user("newbie")
        return {"customer": world.customer.pk, "user": "newbie", "role": "admin"}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"role": RoleChoices.ROLE_ADMIN}

    def assert_updated(self, world: World, obj: Any, response: Any) -> None:
        assert Membership.objects.get(pk=obj.pk).role == RoleChoices.ROLE_ADMIN
        assert response.json()["role"] == RoleChoices.ROLE_ADMIN


class TestPlanAPI(APIViewTestCase):
    basename = "plan"
    model = Plan
    create_roles = update_roles = delete_roles = STAFF
    create_other_status = 403
    delete_status = 409  # the plan is in use (PROTECT); see test_unused_plan_is_deleted
    search_term = "plan-"

    def make_object(self, world: World) -> Plan:
        plan = make_plan()
        world.tenant_customer(plan=plan)
        return plan

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"name": "gold", "memory_mb": 4096, "allowed_caps": ["CAP_NET_RAW"]}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"memory_mb": 8192}

    def assert_deleted(self, world: World, obj: Any) -> None:
        assert Plan.objects.filter(pk=obj.pk).exists()


class TestHostAPI(APIViewTestCase):
    basename = "host"
    model = Host
    tenant_scoped = False
    read_roles = create_roles = update_roles = delete_roles = STAFF
    search_term = "host"

    def make_object(self, world: World) -> Host:
        name = unique("host")
        return Host.objects.create(name=name, agent_socket=f"/run/{name}/agent.sock")

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"name": "node9", "agent_socket": "/run/vservers/agent.sock"}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"state": HostStateChoices.STATE_MAINTENANCE}


class TestIPPoolAPI(APIViewTestCase):
    basename = "ippool"
    model = IPPool
    tenant_scoped = False
    read_roles = create_roles = update_roles = delete_roles = STAFF
    search_term = "pool"

    def make_object(self, world: World) -> IPPool:
        return IPPool.objects.create(name=unique("pool"), family=IPFamilyChoices.FAMILY_4,
                                     network="198.18.100.0/24", first="198.18.100.10",
                                     last="198.18.100.20")

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"name": "extra", "family": 4, "network": "198.19.113.0/24",
                "first": "198.19.113.2", "last": "198.19.113.200", "gateway": "198.19.113.1",
                "host": world.host.pk}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"last": "198.18.100.30"}


class TestIPAddressAPI(APIViewTestCase):
    basename = "ipaddress"
    model = IPAddress
    tenant_scoped = False
    operations = frozenset()
    read_roles = STAFF
    search_term = "198.18.2."

    def make_object(self, world: World) -> IPAddress:
        return world.pool4.allocate(make_vserver(world.customer, world.host, ipv4=0))


class TestAuditLogAPI(APIViewTestCase):
    basename = "auditlog"
    model = AuditLog
    operations = frozenset()
    read_roles = TENANT_ROLES
    search_term = "poke"

    def make_object(self, world: World) -> AuditLog:
        return AuditLog.objects.create(customer=world.customer, actor=world.user("owner"),
                                       actor_name="alice", target_type="vserver",
                                       target_id="1", target_repr="web", action="poke")


# --- what the generic case does not cover -------------------------------------------------

def test_unused_plan_is_deleted_by_staff(world: World) -> None:
    plan = make_plan()
    r = world.client("staff").delete(reverse("plan-detail", args=[plan.pk]))
    assert r.status_code == 204
    assert not Plan.objects.filter(pk=plan.pk).exists()


def test_plan_in_use_answers_409_naming_the_user(world: World) -> None:
    r = world.client("staff").delete(reverse("plan-detail", args=[world.plan.pk]))
    assert r.status_code == 409
    assert "Acme" in r.json()["detail"]


def test_plan_refuses_unsafe_capability(world: World) -> None:
    r = world.client("staff").post(reverse("plan-list"),
                                   {"name": "evil", "allowed_caps": ["CAP_SYS_ADMIN"]},
                                   format="json")
    assert r.status_code == 400
    assert "allowed_caps" in r.json()
    assert not Plan.objects.filter(name="evil").exists()


def test_host_agent_socket_must_be_absolute(world: World) -> None:
    r = world.client("staff").post(reverse("host-list"),
                                   {"name": "bad", "agent_socket": "run/../x.sock"},
                                   format="json")
    assert r.status_code == 400
    assert "agent_socket" in r.json()


def test_customer_shows_effective_limits_usage_and_role(world: World) -> None:
    make_vserver(world.customer, world.host, memory_mb=300, ipv4=2, ipv6=1)
    make_vserver(world.customer, world.host, memory_mb=200, ipv4=1)
    make_vserver(world.other_customer, world.host, memory_mb=999)
    Customer.objects.filter(pk=world.customer.pk).update(override_memory_mb=4096)
    r = world.client("member").get(reverse("customer-detail", args=[world.customer.pk]))
    body = r.json()
    assert body["my_role"] == "member"
    assert body["plan_name"] == "standard"
    assert body["limits"]["memory_mb"] == 4096
    assert body["limits"]["max_vservers"] == world.plan.max_vservers
    assert body["usage"] == {"max_vservers": 2, "max_ipv4": 3, "max_ipv6": 1, "memory_mb": 500,
                             "cpu_cores": "2.00", "disk_gb": 2}


def test_member_cannot_change_own_customer_limits(world: World) -> None:
    for role in ("member", "admin", "owner"):
        r = world.client(role).patch(reverse("customer-detail", args=[world.customer.pk]),
                                     {"override_max_vservers": 999, "plan": None},
                                     format="json")
        assert r.status_code == 403
    c = Customer.objects.get(pk=world.customer.pk)
    assert c.override_max_vservers is None and c.plan == world.plan


def test_members_see_only_their_customers_plans(world: World) -> None:
    secret = make_plan("secret-plan")
    world.other_customer.plan = secret
    world.other_customer.save()
    names = [p["name"] for p in world.client("owner").get(reverse("plan-list")).json()["results"]]
    assert names == ["standard"]
    r = world.client("owner").get(reverse("plan-detail", args=[secret.pk]))
    assert r.status_code == 404


def test_filter_naming_another_tenants_customer_is_refused_like_a_missing_one(
        world: World) -> None:
    client = world.client("owner")
    theirs = client.get(reverse("auditlog-list"), {"customer": world.other_customer.pk})
    missing = client.get(reverse("auditlog-list"), {"customer": 987654321})
    assert theirs.status_code == missing.status_code == 400
    assert theirs.json().keys() == missing.json().keys() == {"customer"}


def test_the_last_owner_cannot_be_removed_or_demoted(world: World) -> None:
    mine = Membership.objects.get(customer=world.customer, user=world.user("owner"))
    client = world.client("owner")
    r = client.patch(reverse("membership-detail", args=[mine.pk]), {"role": "member"},
                     format="json")
    assert r.status_code == 400
    assert r.json()["field"] == "role" and "last owner" in r.json()["detail"]
    r = client.delete(reverse("membership-detail", args=[mine.pk]))
    assert r.status_code == 400
    assert Membership.objects.get(pk=mine.pk).role == RoleChoices.ROLE_OWNER


def test_membership_customer_and_user_cannot_be_changed(world: World) -> None:
    m = Membership.objects.get(customer=world.customer, user=world.user("member"))
    r = world.client("owner").patch(reverse("membership-detail", args=[m.pk]),
                                    {"customer": world.other_customer.pk, "user": "bob"},
                                    format="json")
    assert r.status_code == 200
    m.refresh_from_db()
    assert (m.customer, m.user) == (world.customer, world.user("member"))


def test_owner_cannot_add_members_to_another_tenant(world: World) -> None:
    r = world.client("owner").post(reverse("membership-list"),
                                   {"customer": world.other_customer.pk, "user": "mia",
                                    "role": "owner"}, format="json")
    assert r.status_code == 400
    assert "customer" in r.json()
    assert not Membership.objects.filter(customer=world.other_customer,
                                         user=world.user("member")).exists()


def test_audit_log_records_api_changes(world: World) -> None:
    world.client("staff").post(reverse("host-list"),
                               {"name": "node7", "agent_socket": "/run/n7.sock"}, format="json")
    row = AuditLog.objects.get(action="create-host")
    assert row.actor == world.user("staff") and row.target_repr == "node7"


def test_a_page_holds_at_most_1000_rows(world: World) -> None:
    AuditLog.objects.bulk_create(
        AuditLog(customer=world.customer, actor_name="x", target_type="t", action=f"a{i}")
        for i in range(1005))
    r = world.client("owner").get(reverse("auditlog-list"), {"limit": 100000})
    body = r.json()
    assert body["count"] == 1005 and len(body["results"]) == 1000 and body["next"]


def test_a_new_member_is_a_member_unless_said_otherwise(world: World) -> None:
    make_user("newbie")
    r = world.client("owner").post(reverse("membership-list"),
                                   {"customer": world.customer.pk, "user": "newbie"},
                                   format="json")
    assert r.status_code == 201, r.content
    assert r.json()["role"] == RoleChoices.ROLE_MEMBER
    again = world.client("owner").post(reverse("membership-list"),
                                       {"customer": world.customer.pk, "user": "newbie"},
                                       format="json")
    assert again.status_code == 400 and again.json()["field"] == "user"
