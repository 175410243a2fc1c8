"""The dashboard and a vserver's page: tenants see only theirs, actions are POSTs with
CSRF, disabled actions say why, and errors come back on the field they concern."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from panel.guests.choices import OperationKindChoices, VServerStatusChoices
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.models import AuditLog
from tests.panel.factories import World
from tests.panel.pages.conftest import ClientAs, MakeVServer

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9yZ2FuaXphdGlvbmFsLXRlc3Qta2V5LTAwMDAwMDAw "
       "mia@laptop")

def button(body: str, name: str) -> str:
    """The opening tag of the action button NAME on a vserver page."""
    match = re.search(rf'<button[^>]*id="btn-{name}"[^>]*>', body)
    assert match is not None, f"no {name} button"
    return match.group(0)


def reason(body: str, name: str) -> str:
    match = re.search(rf'id="why-{name}">([^<]*)<', body)
    assert match is not None, f"no reason for {name}"
    return match.group(1)


# --- the dashboard -----------------------------------------------------------------------------

def test_dashboard_shows_the_users_vservers_usage_and_work(client_as: ClientAs,
                                                           vserver_of: MakeVServer,
                                                           people: World) -> None:
    mine = vserver_of(name="web", memory_mb=1024, status=VServerStatusChoices.STATUS_RUNNING)
    vserver_of(people.other_customer, name="theirs")
    Operation.objects.create(vserver=mine, vserver_name="web", customer=mine.customer,
                             kind=OperationKindChoices.KIND_RESTART, progress=40,
                             message="stopping services")
    body = client_as("member").get(reverse("dashboard")).content.decode()
    assert reverse("vserver_detail", args=[mine.pk]) in body
    assert "theirs" not in body
    assert '<span class="badge text-bg-success">Running</span>' in body  # STATUS_COLOURS
    assert "Usage against the plan" in body
    assert "1024 of 65536" in body  # memory, MiB, against the plan's
    assert "Operations in progress" in body and "stopping services" in body
    assert "data-auto-refresh" not in body  # it follows over its websocket, no reload
    # Members may not create vservers: no button offered.
    assert reverse("vserver_create") not in body
    assert reverse("vserver_create") in client_as("owner").get(
        reverse("dashboard")).content.decode()


# --- tenants -----------------------------------------------------------------------------------

ACTION_POSTS: list[tuple[str, dict[str, str]]] = [
    ("vserver_start", {}), ("vserver_stop", {"force": "on"}), ("vserver_restart", {}),
    ("vserver_reinstall", {"confirm": "theirs"}), ("vserver_delete", {"confirm": "theirs"}),
    ("vserver_reset_password", {}), ("vserver_hostname", {"hostname": "pwned.example"}),
    ("vserver_limits", {"memory_mb": "16", "cpu_cores": "1", "disk_gb": "1",
                        "processes": "8"}),
    ("vserver_key_add", {"name": "mine", "key": KEY}),
]


@pytest.mark.parametrize("role", ["member", "owner"])
def test_another_tenants_vserver_answers_404_everywhere_and_nothing_changes(
        client_as: ClientAs, vserver_of: MakeVServer, people: World, role: str) -> None:
    theirs = vserver_of(people.other_customer, name="theirs",
                        status=VServerStatusChoices.STATUS_RUNNING)
    key = SSHKey.objects.create(vserver=theirs, name="k", key=KEY)
    before = (VServer.objects.values().get(pk=theirs.pk), Operation.objects.count(),
              AuditLog.objects.count(), SSHKey.objects.count())
    client = client_as(role)
    assert client.get(reverse("vserver_detail", args=[theirs.pk])).status_code == 404
    for name, data in ACTION_POSTS:
        response = client.post(reverse(name, args=[theirs.pk]), data)
        assert response.status_code == 404, name
    response = client.post(reverse("vserver_key_remove", args=[theirs.pk, key.pk]))
    assert response.status_code == 404
    after = (VServer.objects.values().get(pk=theirs.pk), Operation.objects.count(),
             AuditLog.objects.count(), SSHKey.objects.count())
    assert after == before
    # A missing vserver answers the same.
    assert client.get(reverse("vserver_detail", args=[theirs.pk + 1000])).status_code == 404
    assert "theirs" not in client.get(reverse("vserver_list")).content.decode()


def test_action_urls_take_posts_only(client_as: ClientAs, vserver_of: MakeVServer,
                                     people: World) -> None:
    vs = vserver_of()
    assert client_as("owner").get(reverse("vserver_start", args=[vs.pk])).status_code == 405


def test_csrf_is_enforced_on_action_posts(vserver_of: MakeVServer, people: World) -> None:
    vs = vserver_of()
    client = Client(enforce_csrf_checks=True)
    client.force_login(people.users["member"])
    response = client.post(reverse("vserver_start", args=[vs.pk]))
    assert response.status_code == 403
    assert not Operation.objects.filter(vserver=vs).exists()

    page = client.get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    response = client.post(reverse("vserver_start", args=[vs.pk]),
                           {"csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302
    assert Operation.objects.filter(vserver=vs, kind=OperationKindChoices.KIND_START).exists()


# --- what a role may do, and why not -------------------------------------------------------------

def test_member_sees_start_enabled_and_delete_disabled_with_the_reason(
        client_as: ClientAs, vserver_of: MakeVServer, people: World) -> None:
    vs = vserver_of(name="web")  # stopped
    body = client_as("member").get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    assert "disabled" not in button(body, "start")
    assert 'id="modal-start"' in body
    assert "disabled" in button(body, "delete")
    assert reason(body, "delete") == "your role (member) may not delete"
    assert 'id="modal-delete"' not in body  # no dialog for what may not be done
    assert "disabled" in button(body, "stop")
    assert reason(body, "stop") == "not running"
    assert reason(body, "reinstall") == "your role (member) may not reinstall"
    assert reason(body, "hostname") == "your role (member) may not change the hostname"


def test_busy_vserver_disables_its_lifecycle_actions(client_as: ClientAs,
                                                     vserver_of: MakeVServer,
                                                     people: World) -> None:
    vs = vserver_of(status=VServerStatusChoices.STATUS_STARTING)
    body = client_as("owner").get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    for name in ("start", "stop", "restart", "reinstall", "delete"):
        assert "disabled" in button(body, name), name
        assert reason(body, name) == "busy: starting", name
    assert "data-auto-refresh" not in body  # it follows over its websocket, no reload


def test_owner_of_a_running_vserver_may_do_everything_but_start(
        client_as: ClientAs, vserver_of: MakeVServer, people: World) -> None:
    vs = vserver_of(status=VServerStatusChoices.STATUS_RUNNING)
    body = client_as("owner").get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    assert reason(body, "start") == "already running"
    for name in ("stop", "restart", "reset_password", "reinstall", "delete"):
        assert "disabled" not in button(body, name), name
    assert 'name="force"' in body  # the stop dialog's force option


def test_a_denied_action_shows_the_actions_message(client_as: ClientAs,
                                                    vserver_of: MakeVServer,
                                                    people: World) -> None:
    vs = vserver_of(name="web")
    client = client_as("member")
    response = client.post(reverse("vserver_delete", args=[vs.pk]), {"confirm": "web"},
                           follow=True)
    assert "your role (member) may not delete vserver" in response.content.decode()
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_STOPPED


# --- actions -------------------------------------------------------------------------------------

def test_start_records_an_operation_and_an_audit_row_with_the_address(
        client_as: ClientAs, vserver_of: MakeVServer, people: World) -> None:
    vs = vserver_of(name="web")
    client = client_as("member")
    response = client.post(reverse("vserver_start", args=[vs.pk]), REMOTE_ADDR="198.19.113.9")
    assert response.status_code == 302
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_STARTING
    row = AuditLog.objects.get(action="start-vserver", target_id=str(vs.pk))
    assert row.source_ip == "198.19.113.9"
    assert row.actor == people.users["member"]
    body = client.get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    assert "web is starting." in body
    assert "start-vserver" in body  # the audit rows of this vserver
    assert "Pending" in body  # its operation


def test_stop_passes_the_force_option(client_as: ClientAs, vserver_of: MakeVServer,
                                      people: World) -> None:
    vs = vserver_of(status=VServerStatusChoices.STATUS_RUNNING)
    client_as("member").post(reverse("vserver_stop", args=[vs.pk]), {"force": "on"})
    op = Operation.objects.get(vserver=vs)
    assert op.kind == OperationKindChoices.KIND_STOP
    assert op.result == {"force": True}


def test_delete_needs_the_typed_name_and_says_so_on_the_field(
        client_as: ClientAs, vserver_of: MakeVServer, people: World) -> None:
    vs = vserver_of(name="web")
    client = client_as("owner")
    response = client.post(reverse("vserver_delete", args=[vs.pk]), {"confirm": "wbe"})
    assert response.status_code == 400
    body = response.content.decode()
    assert "type the vserver&#x27;s name (web) to confirm the deletion" in body
    assert re.search(r'id="id_delete_confirm"[^>]*class="[^"]*is-invalid', body) or \
        re.search(r'class="[^"]*is-invalid[^"]*"[^>]*id="id_delete_confirm"', body)
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_STOPPED
    response = client.post(reverse("vserver_delete", args=[vs.pk]), {"confirm": "web"})
    assert response.status_code == 302
    vs.refresh_from_db()
    assert vs.status == VServerStatusChoices.STATUS_DELETING


def test_reset_password_shows_it_once_and_uncached(client_as: ClientAs,
                                                   vserver_of: MakeVServer,
                                                   people: World) -> None:
    vs = vserver_of(status=VServerStatusChoices.STATUS_RUNNING)
    client = client_as("owner")
    response = client.post(reverse("vserver_reset_password", args=[vs.pk]))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    password = re.search(r'id="root-password" value="([^"]+)"', response.content.decode())
    assert password is not None and len(password.group(1)) >= 16
    op = Operation.objects.get(vserver=vs, kind=OperationKindChoices.KIND_RESET_PASSWORD)
    assert password.group(1) not in str(op.result)  # a hash only
    page = client.get(reverse("vserver_detail", args=[vs.pk])).content.decode()
    assert password.group(1) not in page


def test_limits_beyond_the_plan_come_back_on_the_field(client_as: ClientAs,
                                                       vserver_of: MakeVServer,
                                                       people: World) -> None:
    vs = vserver_of()
    response = client_as("owner").post(reverse("vserver_limits", args=[vs.pk]), {
        "memory_mb": "999999", "cpu_cores": "1", "disk_gb": "1", "processes": "128"})
    assert response.status_code == 400
    body = response.content.decode()
    assert "plan limit: MiB of memory" in body
    assert re.search(r'<input[^>]*name="memory_mb"[^>]*is-invalid|'
                     r'<input[^>]*is-invalid[^>]*name="memory_mb"', body)
    vs.refresh_from_db()
    assert vs.memory_mb == 256


def test_hostname_and_ssh_keys(client_as: ClientAs, vserver_of: MakeVServer,
                               people: World) -> None:
    vs = vserver_of()
    client = client_as("admin")
    response = client.post(reverse("vserver_hostname", args=[vs.pk]), {"hostname": "bad_name"})
    assert response.status_code == 400
    response = client.post(reverse("vserver_hostname", args=[vs.pk]),
                           {"hostname": "www.example.org"})
    assert response.status_code == 302
    vs.refresh_from_db()
    assert vs.hostname == "www.example.org"

    response = client.post(reverse("vserver_key_add", args=[vs.pk]),
                           {"name": "bad", "key": "not a key"})
    assert response.status_code == 400
    assert "one OpenSSH public key line" in response.content.decode()
    client.post(reverse("vserver_key_add", args=[vs.pk]), {"name": "laptop", "key": KEY})
    key = SSHKey.objects.get(vserver=vs)
    client.post(reverse("vserver_key_remove", args=[vs.pk, key.pk]))
    assert not SSHKey.objects.filter(vserver=vs).exists()


# --- creating ------------------------------------------------------------------------------------

def _create(client: Client, customer: Any, **over: str) -> Any:
    data = {"customer": str(customer.pk), "name": "new1", "hostname": "", "template": "",
            "memory_mb": "256", "cpu_cores": "1", "disk_gb": "1", "processes": "128",
            "ipv4": "1", "ipv6": "0", **over}
    return client.post(reverse("vserver_create"), data)


def test_create_vserver_calls_the_action(client_as: ClientAs, people: World) -> None:
    response = _create(client_as("owner"), people.customer)
    assert response.status_code == 302
    vs = VServer.objects.get(name="new1")
    assert response["Location"] == reverse("vserver_detail", args=[vs.pk])
    assert vs.status == VServerStatusChoices.STATUS_BUILDING
    assert vs.ips.count() == 1


def test_create_vserver_puts_the_plans_refusal_on_the_field(client_as: ClientAs,
                                                             people: World) -> None:
    response = _create(client_as("owner"), people.customer, memory_mb="9999999")
    assert response.status_code == 400
    body = response.content.decode()
    assert "plan limit: MiB of memory" in body
    assert re.search(r'<input[^>]*name="memory_mb"[^>]*is-invalid|'
                     r'<input[^>]*is-invalid[^>]*name="memory_mb"', body)
    assert not VServer.objects.filter(name="new1").exists()


def test_members_may_not_pick_a_customer_to_create_in(client_as: ClientAs,
                                                      people: World) -> None:
    response = _create(client_as("member"), people.customer)
    assert response.status_code == 400  # the customer is not among the choices
    response = _create(client_as("owner"), people.other_customer)
    assert response.status_code == 400
    assert not VServer.objects.filter(name="new1").exists()
