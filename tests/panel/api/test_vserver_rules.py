"""What the vserver API refuses: fields a role may not set, plan limits, another
tenant's objects in every route, and the shape of an action's error."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse

from panel.guests.choices import DesiredStateChoices, VServerStatusChoices
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.models import AuditLog, Customer, Host, IPPool
from tests.panel.api.test_guests_api import ssh_key
from tests.panel.factories import World, make_plan, make_vserver


def create(world: World, role: str = "owner", **data: Any) -> Any:
    payload = {"customer": world.customer.pk, "name": "web", **data}
    return world.client(role).post(reverse("vserver-list"), payload, format="json")


def row(vs: VServer) -> dict[str, Any]:
    values = VServer.objects.filter(pk=vs.pk).values().get()
    values["ips"] = sorted(vs.ips.values_list("address", flat=True))
    return values


# --- mass assignment ------------------------------------------------------------------------

def test_create_ignores_fields_the_panel_decides(world: World) -> None:
    elsewhere = Host.objects.create(name="node2", agent_socket="/run/n2.sock",
                                    state="disabled")
    r = create(world, host=elsewhere.pk, status="running", context_id=4242, init_pid=1,
               desired_state="stopped", ips=["198.18.2.99"], id=777)
    assert r.status_code == 202, r.content
    vs = VServer.objects.get(pk=r.json()["vserver"]["id"])
    assert vs.pk != 777
    assert vs.host == world.host
    assert vs.status == VServerStatusChoices.STATUS_BUILDING
    assert vs.context_id is None and vs.init_pid is None
    assert vs.desired_state == DesiredStateChoices.DESIRED_RUNNING
    assert list(vs.ips.values_list("address", flat=True)) == ["198.18.2.10"]


def test_create_for_another_tenants_customer_is_refused_like_a_missing_one(
        world: World) -> None:
    theirs = create(world, customer=world.other_customer.pk)
    missing = create(world, customer=987654321)
    assert theirs.status_code == missing.status_code == 400
    assert theirs.json()["customer"][0].replace(str(world.other_customer.pk), "N") == \
        missing.json()["customer"][0].replace("987654321", "N")
    assert not VServer.objects.exists()


def test_member_may_not_create(world: World) -> None:
    r = create(world, "member")
    assert r.status_code == 403 and "member" in r.json()["detail"]
    assert not VServer.objects.exists()


def test_patch_ignores_read_only_fields(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    elsewhere = Host.objects.create(name="node2", agent_socket="/run/n2.sock")
    before = row(vs)
    r = world.client("owner").patch(reverse("vserver-detail", args=[vs.pk]), {
        "customer": world.other_customer.pk, "host": elsewhere.pk, "host_id": elsewhere.pk,
        "ips": [{"address": "198.18.2.200"}], "status": "running", "context_id": 1,
        "desired_state": "stopped", "name": "renamed", "capabilities": ["CAP_SYS_ADMIN"],
        "flags": ["fakeinit"], "template": "debian", "onboot": False,
    }, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["operations"] == []
    assert row(vs) == before
    assert not Operation.objects.exists()


def test_staff_patch_cannot_move_a_vserver_either(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    before = row(vs)
    r = world.client("staff").patch(reverse("vserver-detail", args=[vs.pk]),
                                    {"customer": world.other_customer.pk, "status": "running"},
                                    format="json")
    assert r.status_code == 200
    assert row(vs) == before


def test_put_is_not_offered(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    r = world.client("owner").put(reverse("vserver-detail", args=[vs.pk]), {"hostname": "x"},
                                  format="json")
    assert r.status_code == 405


# --- plan limits ------------------------------------------------------------------------------

def tight(world: World, **limits: Any) -> Customer:
    plan = make_plan(**{"max_vservers": 2, "memory_mb": 1024, "cpu_cores": Decimal(2),
                        "disk_gb": 10, "max_ipv4": 2, "max_ipv6": 0, "processes": 256,
                        **limits})
    Customer.objects.filter(pk=world.customer.pk).update(plan=plan)
    return Customer.objects.get(pk=world.customer.pk)


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"memory_mb": 1500}, "memory_mb", "MiB of memory: 1500 asked in total, the plan allows "
                                       "1024 (476 over)"),
    ({"cpu_cores": "2.5"}, "cpu_cores", "CPU cores: 2.50 asked in total, the plan allows 2"),
    ({"disk_gb": 11}, "disk_gb", "GiB of disk: 11 asked in total, the plan allows 10 (1 over)"),
    ({"ipv4": 3}, "ipv4", "IPv4 addresses: 3 asked in total, the plan allows 2 (1 over)"),
    ({"ipv6": 1}, "ipv6", "IPv6 addresses: 1 asked in total, the plan allows 0 (1 over)"),
    ({"processes": 300}, "processes", "processes per vserver: 300 asked, the plan allows 256 "
                                      "(44 over)"),
    ({"capabilities": ["CAP_SYS_TIME"]}, "capabilities", "CAP_SYS_TIME is not in your plan"),
])
def test_create_beyond_the_plan_names_the_limit_and_the_excess(
        world: World, data: dict[str, Any], field: str, words: str) -> None:
    tight(world)
    r = create(world, **data)
    assert r.status_code == 400, r.content
    body = r.json()
    assert body["field"] == field
    assert words in body["detail"]
    assert body[field] == [body["detail"]]
    assert not VServer.objects.exists()


def test_create_beyond_the_vserver_count(world: World) -> None:
    customer = tight(world, max_vservers=1)
    make_vserver(customer, world.host, memory_mb=16, ipv4=0)
    r = create(world, memory_mb=16, ipv4=0)
    assert r.status_code == 400
    assert "vservers: 2 asked in total, the plan allows 1 (1 over)" in r.json()["detail"]


def test_customer_override_raises_the_plan_limit(world: World) -> None:
    tight(world)
    Customer.objects.filter(pk=world.customer.pk).update(override_memory_mb=2048)
    assert create(world, memory_mb=1500).status_code == 202


def test_resize_beyond_the_plan_names_the_limit_and_changes_nothing(world: World) -> None:
    customer = tight(world)
    vs = make_vserver(customer, world.host, memory_mb=512)
    make_vserver(customer, world.host, memory_mb=256, ipv4=0)
    before = row(vs)
    r = world.client("owner").patch(reverse("vserver-detail", args=[vs.pk]),
                                    {"memory_mb": 900, "hostname": "new.example.org"},
                                    format="json")
    assert r.status_code == 400
    body = r.json()
    assert body["field"] == "memory_mb"
    assert "1156 asked in total, the plan allows 1024 (132 over)" in body["detail"]
    assert row(vs) == before  # the hostname neither: both changes or none
    assert not Operation.objects.exists()


def test_resize_within_the_plan(world: World) -> None:
    customer = tight(world)
    vs = make_vserver(customer, world.host, memory_mb=512)
    r = world.client("admin").patch(reverse("vserver-detail", args=[vs.pk]),
                                    {"memory_mb": 1024, "cpu_cores": "2"}, format="json")
    assert r.status_code == 202, r.content
    vs.refresh_from_db()
    assert (vs.memory_mb, vs.cpu_cores) == (1024, Decimal(2))


def test_serializer_bounds_are_refused_before_any_action(world: World) -> None:
    r = create(world, memory_mb=1, name="Bad Name!")
    assert r.status_code == 400
    assert set(r.json()) >= {"memory_mb", "name"}


# --- another tenant's vserver: every route answers as for a missing one -------------------

def tenant_b_vserver(world: World) -> VServer:
    vs = make_vserver(world.other_customer, world.host)
    SSHKey.objects.create(vserver=vs, name="theirs", key=ssh_key(7))
    return vs


ROUTES = [
    ("get", "vserver-detail", None),
    ("patch", "vserver-detail", {"hostname": "pwned.example.org", "memory_mb": 32}),
    ("delete", "vserver-detail", None),
    ("post", "vserver-start", {}),
    ("post", "vserver-stop", {"force": True}),
    ("post", "vserver-restart", {}),
    ("post", "vserver-reinstall", {"confirm": "NAME"}),
    ("post", "vserver-reset-password", {}),
    ("get", "vserver-ssh-key-list", None),
    ("post", "vserver-ssh-key-list", {"name": "mine", "key": ssh_key(9)}),
]


@pytest.mark.parametrize("role", ["owner", "admin", "member"])
@pytest.mark.parametrize(("method", "name", "data"), ROUTES)
def test_another_tenants_vserver_answers_404_on_every_route(
        world: World, role: str, method: str, name: str, data: Any) -> None:
    vs = tenant_b_vserver(world)
    VServer.objects.filter(pk=vs.pk).update(status=VServerStatusChoices.STATUS_RUNNING)
    if data and data.get("confirm") == "NAME":
        data = {"confirm": vs.name}
    before = (row(vs), Operation.objects.count(), SSHKey.objects.count(),
              AuditLog.objects.count())
    client = world.client(role)
    call = getattr(client, method)
    query = f"?confirm={vs.name}" if method == "delete" else ""
    args: list[Any] = [data] if data is not None else []
    seen = call(reverse(name, args=[vs.pk]) + query, *args, format="json")
    missing = call(reverse(name, args=[987654321]) + query, *args, format="json")
    assert seen.status_code == missing.status_code == 404, seen.content
    assert seen.content == missing.content
    assert (row(vs), Operation.objects.count(), SSHKey.objects.count(),
            AuditLog.objects.count()) == before


def test_another_tenants_key_is_missing_under_my_vserver(world: World) -> None:
    mine = make_vserver(world.customer, world.host)
    theirs = tenant_b_vserver(world).ssh_keys.get()
    client = world.client("owner")
    url = reverse("vserver-ssh-key-detail", args=[mine.pk, theirs.pk])
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404
    assert SSHKey.objects.filter(pk=theirs.pk).exists()


def test_list_shows_only_the_tenants_vservers(world: World) -> None:
    mine = make_vserver(world.customer, world.host)
    make_vserver(world.other_customer, world.host)
    for role in ("owner", "member"):
        ids = [v["id"] for v in world.client(role).get(reverse("vserver-list")).json()["results"]]
        assert ids == [mine.pk]
    assert world.client("staff").get(reverse("vserver-list")).json()["count"] == 2


def test_filters_and_search_stay_within_the_tenant(world: World) -> None:
    make_vserver(world.other_customer, world.host, name="secret")
    client = world.client("owner")
    assert client.get(reverse("vserver-list"), {"search": "secret"}).json()["results"] == []
    assert client.get(reverse("vserver-list"), {"name": "secret"}).json()["results"] == []
    r = client.get(reverse("vserver-list"), {"customer": world.other_customer.pk})
    assert r.status_code == 400


def test_customers_see_their_addresses_only_through_the_vserver(world: World) -> None:
    vs = make_vserver(world.customer, world.host, ipv4=1, ipv6=1)
    body = world.client("member").get(reverse("vserver-detail", args=[vs.pk])).json()
    assert [(ip["address"], ip["family"], ip["prefixlen"]) for ip in body["ips"]] == [
        ("198.18.2.10", 4, 24), ("fd00:db8::10", 6, 64)]
    assert body["host"] == "node1" and body["customer"] == world.customer.pk
    assert world.client("member").get(reverse("ipaddress-list")).status_code == 403
    assert world.client("member").get(reverse("ippool-list")).status_code == 403


# --- actions: answers and errors ---------------------------------------------------------------

def test_busy_vserver_answers_400_with_the_field(world: World) -> None:
    vs = make_vserver(world.customer, world.host, status=VServerStatusChoices.STATUS_STARTING)
    r = world.client("member").post(reverse("vserver-start", args=[vs.pk]))
    assert r.status_code == 400
    body = r.json()
    assert body["field"] == "status" and "starting" in body["detail"]
    assert body["status"] == [body["detail"]]
    assert not Operation.objects.exists()


def test_member_may_operate_but_not_reinstall(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    client = world.client("member")
    r = client.post(reverse("vserver-start", args=[vs.pk]))
    assert r.status_code == 202
    assert r.json()["vserver"]["status"] == VServerStatusChoices.STATUS_STARTING
    assert r.json()["operation"]["kind"] == "start"
    VServer.objects.filter(pk=vs.pk).update(status=VServerStatusChoices.STATUS_RUNNING)
    r = client.post(reverse("vserver-reinstall", args=[vs.pk]), {"confirm": vs.name},
                    format="json")
    assert r.status_code == 403 and "member" in r.json()["detail"]


def test_delete_needs_the_name_to_confirm(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    client = world.client("owner")
    for query in ("", "?confirm=wrong"):
        r = client.delete(reverse("vserver-detail", args=[vs.pk]) + query)
        assert r.status_code == 400 and r.json()["field"] == "confirm"
    assert VServer.objects.get(pk=vs.pk).status == VServerStatusChoices.STATUS_STOPPED
    r = client.delete(reverse("vserver-detail", args=[vs.pk]), {"confirm": vs.name},
                      format="json")
    assert r.status_code == 202
    assert r.json()["operation"]["kind"] == "delete"


def test_reinstall_can_change_the_template_within_the_plan(world: World) -> None:
    tight(world, templates=["debian-12"])
    vs = make_vserver(world.customer, world.host)
    client = world.client("owner")
    r = client.post(reverse("vserver-reinstall", args=[vs.pk]),
                    {"confirm": vs.name, "template": "centos"}, format="json")
    assert r.status_code == 400 and r.json()["field"] == "template"
    r = client.post(reverse("vserver-reinstall", args=[vs.pk]),
                    {"confirm": vs.name, "template": "debian-12"}, format="json")
    assert r.status_code == 202
    assert VServer.objects.get(pk=vs.pk).template == "debian-12"


def test_reset_password_shows_the_password_once(world: World) -> None:
    vs = make_vserver(world.customer, world.host, status=VServerStatusChoices.STATUS_RUNNING)
    r = world.client("owner").post(reverse("vserver-reset-password", args=[vs.pk]))
    assert r.status_code == 202
    assert r["Cache-Control"] == "no-store"
    body = r.json()
    password = body["password"]
    assert len(password) >= 16
    assert body["operation"]["result"] == {}  # the hash it carries is not shown
    op = Operation.objects.get(pk=body["operation"]["id"])
    assert password not in str(op.result) and "password_hash" in op.result
    shown = world.client("owner").get(reverse("operation-detail", args=[op.pk])).content
    assert password.encode() not in shown
    assert b"password_hash" not in shown and b"$6$" not in shown
    assert password.encode() not in world.client("owner").get(
        reverse("vserver-detail", args=[vs.pk])).content


def test_ssh_keys_are_added_listed_and_removed(world: World) -> None:
    vs = make_vserver(world.customer, world.host)
    client = world.client("admin")
    url = reverse("vserver-ssh-key-list", args=[vs.pk])
    r = client.post(url, {"name": "laptop", "key": ssh_key(1)}, format="json")
    assert r.status_code == 201
    assert r.json()["fingerprint"].startswith("SHA256:")
    r = client.post(url, {"name": "laptop", "key": ssh_key(2)}, format="json")
    assert r.status_code == 400  # one name per vserver
    r = client.post(url, {"name": "junk", "key": "not a key"}, format="json")
    assert r.status_code == 400 and "key" in r.json()
    listed = world.client("member").get(url).json()["results"]
    assert [k["name"] for k in listed] == ["laptop"]
    key_id = listed[0]["id"]
    assert world.client("member").delete(
        reverse("vserver-ssh-key-detail", args=[vs.pk, key_id])).status_code == 403
    assert client.delete(reverse("vserver-ssh-key-detail", args=[vs.pk, key_id])).status_code \
        == 204
    assert not SSHKey.objects.exists()


def test_operations_list_filters_by_vserver(world: World) -> None:
    a = make_vserver(world.customer, world.host)
    b = make_vserver(world.customer, world.host)
    client = world.client("owner")
    client.post(reverse("vserver-start", args=[a.pk]))
    client.post(reverse("vserver-start", args=[b.pk]))
    r = client.get(reverse("operation-list"), {"vserver": a.pk})
    assert [o["vserver"] for o in r.json()["results"]] == [a.pk]
    r = client.get(reverse("operation-list"), {"done": "false", "kind": "start"})
    assert r.json()["count"] == 2


def test_pool_exhaustion_is_a_400_naming_the_family(world: World) -> None:
    IPPool.objects.filter(pk=world.pool4.pk).update(first="198.18.2.10", last="198.18.2.10")
    make_vserver(world.customer, world.host)
    r = create(world)
    assert r.status_code == 400
    assert r.json()["field"] == "ipv4"
    assert not VServer.objects.filter(name="web").exists()
