"""Staff pages (customers, plans, hosts, IP pools, all vservers, audit log) and the
Django admin: staff only, ModelForms that run the models' clean(), changes audited."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.test import Client, RequestFactory
from django.urls import reverse

from panel.guests.models import VServer
from panel.hosting.models import AuditLog, Customer, IPPool, Membership, Plan
from tests.panel.factories import World, make_user
from tests.panel.pages.conftest import ClientAs, MakeVServer

STAFF_PAGES = ["customer_list", "customer_create", "plan_list", "plan_create", "host_list",
               "host_create", "pool_list", "pool_create", "staff_vserver_list", "audit_log"]


@pytest.mark.parametrize("name", STAFF_PAGES)
def test_staff_pages_are_refused_to_others(client: Client, client_as: ClientAs,
                                           people: World, name: str) -> None:
    url = reverse(name)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    for role in ("member", "owner"):
        assert client_as(role).get(url).status_code == 404, role
    assert client_as("staff").get(url).status_code == 200


def test_staff_object_pages_and_posts_are_refused_to_others(client_as: ClientAs,
                                                            people: World) -> None:
    owner = client_as("owner")
    c = people.customer
    for url in (reverse("customer_edit", args=[c.pk]), reverse("plan_edit", args=[people.plan.pk]),
                reverse("host_edit", args=[people.host.pk]),
                reverse("pool_edit", args=[people.pool4.pk])):
        assert owner.get(url).status_code == 404, url
        assert owner.post(url, {"name": "x"}).status_code == 404, url
    response = owner.post(reverse("member_add", args=[c.pk]),
                          {"username": "bob", "role": "owner"})
    assert response.status_code == 404
    assert not Membership.objects.filter(customer=c, user=people.users["other"]).exists()


def test_staff_nav_is_shown_to_staff_only(client_as: ClientAs, people: World) -> None:
    assert reverse("audit_log") not in client_as("owner").get(
        reverse("dashboard")).content.decode()
    assert reverse("audit_log") in client_as("staff").get(reverse("dashboard")).content.decode()


def test_plan_form_runs_the_models_clean_and_audits(client_as: ClientAs, people: World) -> None:
    staff = client_as("staff")
    data = {"name": "tiny", "description": "", "max_vservers": "1", "max_ipv4": "1",
            "max_ipv6": "0", "memory_mb": "128", "cpu_cores": "0.5", "disk_gb": "2",
            "processes": "64", "allowed_caps": '["CAP_NOPE"]', "allowed_flags": "[]",
            "templates": "[]"}
    response = staff.post(reverse("plan_create"), data)
    assert response.status_code == 400
    assert "unknown capability" in response.content.decode()
    assert not Plan.objects.filter(name="tiny").exists()
    response = staff.post(reverse("plan_create"), {**data, "allowed_caps": "[]"})
    assert response.status_code == 302
    plan = Plan.objects.get(name="tiny")
    assert AuditLog.objects.filter(action="create-plan", target_id=str(plan.pk)).exists()
    assert "tiny" in staff.get(reverse("plan_list")).content.decode()


def test_customer_create_edit_and_members(client_as: ClientAs, people: World) -> None:
    staff = client_as("staff")
    response = staff.post(reverse("customer_create"), {
        "name": "Classroom 1", "slug": "class-1", "kind": "classroom",
        "plan": str(people.plan.pk), "is_active": "on", "override_memory_mb": "2048"})
    assert response.status_code == 302
    c = Customer.objects.get(slug="class-1")
    assert c.limits().memory_mb == 2048
    assert response["Location"] == reverse("customer_edit", args=[c.pk])
    make_user("teacher")
    response = staff.post(reverse("member_add", args=[c.pk]),
                          {"username": "teacher", "role": "owner"})
    assert Membership.objects.get(customer=c, user__username="teacher").role == "owner"
    response = staff.post(reverse("member_add", args=[c.pk]),
                          {"username": "nobody", "role": "member"}, follow=True)
    assert "no user" in response.content.decode()
    page = staff.get(reverse("customer_edit", args=[c.pk])).content.decode()
    assert "teacher" in page and "2048 MiB" in page
    # The last owner stays: the action refuses, and the page says why.
    m = Membership.objects.get(customer=c, user__username="teacher")
    response = staff.post(reverse("member_remove", args=[c.pk, m.pk]), follow=True)
    assert "last owner" in response.content.decode()
    assert Membership.objects.filter(pk=m.pk).exists()


def test_pool_list_counts_used_and_free(client_as: ClientAs, vserver_of: MakeVServer,
                                        people: World) -> None:
    vserver_of()  # takes one IPv4 address
    small = IPPool.objects.create(name="small", family=4, network="198.18.100.0/29",
                                  first="198.18.100.1", last="198.18.100.6",
                                  gateway="198.18.100.1", reserved=["198.18.100.2"])
    body = client_as("staff").get(reverse("pool_list")).content.decode()
    # v4: .10 to .250 is 241 addresses, 1 used; small: .1-.6 less gateway and reserved = 4.
    assert "<td>1</td>\n    <td>240</td>" in body
    assert "<td>0</td>\n    <td>4</td>" in body
    assert small.name in body


def test_pool_form_runs_the_models_clean(client_as: ClientAs, people: World) -> None:
    response = client_as("staff").post(reverse("pool_create"), {
        "name": "bad", "family": "4", "network": "198.18.2.0/24", "first": "198.18.3.1",
        "last": "198.18.2.20", "reserved": "[]"})
    assert response.status_code == 400
    assert "is not in 198.18.2.0/24" in response.content.decode()


def test_all_vservers_and_audit_log_filters(client_as: ClientAs, vserver_of: MakeVServer,
                                            people: World) -> None:
    mine = vserver_of(name="alpha")
    theirs = vserver_of(people.other_customer, name="beta")
    staff = client_as("staff")
    body = staff.get(reverse("staff_vserver_list")).content.decode()
    assert "alpha" in body and "beta" in body
    body = staff.get(reverse("staff_vserver_list"),
                     {"customer": people.other_customer.pk}).content.decode()
    assert "beta" in body and "alpha" not in body

    client_as("owner").post(reverse("vserver_start", args=[mine.pk]))
    client_as("other").post(reverse("vserver_start", args=[theirs.pk]))
    client_as("other").post(reverse("vserver_hostname", args=[theirs.pk]),
                            {"hostname": "b.example"})
    body = staff.get(reverse("audit_log"), {"customer": people.customer.pk}).content.decode()
    assert "alpha" in body and "beta" not in body
    body = staff.get(reverse("audit_log"), {"action": "set-hostname"}).content.decode()
    assert "beta" in body and "start-vserver</code>" not in body


def test_admin_registers_every_model_and_keeps_the_audit_log_read_only(people: World) -> None:
    from django.apps import apps

    for app in ("hosting", "guests"):
        for model in apps.get_app_config(app).get_models():
            assert admin.site.is_registered(model), model
    request = RequestFactory().get("/admin/")
    request.user = people.users["staff"]
    request.user.is_superuser = True
    model_admin = admin.site._registry[AuditLog]
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request)
    assert not model_admin.has_delete_permission(request)
    assert model_admin.has_view_permission(request)
    vs_admin = admin.site._registry[VServer]
    assert not vs_admin.has_add_permission(request)
    assert not vs_admin.has_change_permission(request)


def test_admin_pages_load_for_a_superuser(client: Client, vserver_of: MakeVServer,
                                          people: World) -> None:
    vs = vserver_of()
    root = people.users["staff"]
    root.is_superuser = True
    root.save()
    client.force_login(root)
    client.post(reverse("vserver_start", args=[vs.pk]))
    for url in ("/admin/", "/admin/hosting/customer/", "/admin/hosting/auditlog/",
                "/admin/hosting/apitoken/", "/admin/hosting/ippool/", "/admin/guests/vserver/",
                f"/admin/guests/vserver/{vs.pk}/change/", "/admin/guests/operation/",
                f"/admin/hosting/customer/{people.customer.pk}/change/"):
        assert client.get(url).status_code == 200, url
    row = AuditLog.objects.first()
    assert row is not None
    page = client.get(f"/admin/hosting/auditlog/{row.pk}/change/").content.decode()
    assert 'name="_save"' not in page
