"""The guests app's endpoints through the generic API test case: vservers, their
actions and SSH keys, and operations."""

from __future__ import annotations

import base64
from typing import Any

from django.urls import reverse

from panel.guests.choices import OperationKindChoices, VServerStatusChoices
from panel.guests.models import Operation, SSHKey, VServer
from tests.panel.api.base import MANAGERS, TENANT_ROLES, ActionSpec, APIViewTestCase
from tests.panel.factories import World, make_vserver


def ssh_key(seed: int = 0, comment: str = "test") -> str:
    """An OpenSSH ed25519 public key line (its 32 key bytes made up)."""
    blob = b"".join(len(p).to_bytes(4, "big") + p
                    for p in (b"ssh-ed25519", bytes([seed]) * 32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


KEY = ssh_key()


def _running(vs: VServer) -> None:
    VServer.objects.filter(pk=vs.pk).update(status=VServerStatusChoices.STATUS_RUNNING)


class TestVServerAPI(APIViewTestCase):
    basename = "vserver"
    model = VServer
    create_status = 202
    update_status = 202
    delete_status = 202
    search_term = "vs"
    actions = (
        ActionSpec("start", TENANT_ROLES),
        ActionSpec("stop", TENANT_ROLES, payload=lambda vs: {"force": True}, prepare=_running),
        ActionSpec("restart", TENANT_ROLES, prepare=_running),
        ActionSpec("reinstall", MANAGERS, payload=lambda vs: {"confirm": vs.name}),
        ActionSpec("reset-password", MANAGERS, prepare=_running),
    )

    def make_object(self, world: World) -> VServer:
        return make_vserver(world.customer, world.host)

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"customer": world.customer.pk, "name": "fresh", "hostname": "fresh.example.org",
                "memory_mb": 512, "cpu_cores": "1.5", "processes": 200, "disk_gb": 2,
                "ipv4": 1, "ipv6": 1, "capabilities": ["CAP_NET_RAW"], "onboot": False}

    def update_payload(self, world: World, obj: Any) -> dict[str, Any]:
        return {"hostname": "renamed.example.org", "memory_mb": 1024}

    def delete_query(self, obj: Any) -> str:
        return f"?confirm={obj.name}"

    def assert_created(self, world: World, response: Any) -> None:
        body = response.json()
        vs = VServer.objects.get(pk=body["vserver"]["id"])
        assert (vs.customer, vs.host, vs.name, vs.memory_mb) == (world.customer, world.host,
                                                                 "fresh", 512)
        assert body["vserver"]["status"] == VServerStatusChoices.STATUS_BUILDING
        assert sorted(ip["family"] for ip in body["vserver"]["ips"]) == [4, 6]
        assert body["operation"]["kind"] == OperationKindChoices.KIND_CREATE
        assert response["Location"].endswith(f"/api/v1/vservers/{vs.pk}/")

    def assert_updated(self, world: World, obj: Any, response: Any) -> None:
        vs = VServer.objects.get(pk=obj.pk)
        assert (vs.hostname, vs.memory_mb) == ("renamed.example.org", 1024)
        kinds = [op["kind"] for op in response.json()["operations"]]
        assert kinds == [OperationKindChoices.KIND_SET_HOSTNAME,
                         OperationKindChoices.KIND_SET_LIMITS]

    def assert_deleted(self, world: World, obj: Any) -> None:
        # Deleting is an operation: the row goes when the agent has removed the guest.
        assert VServer.objects.get(pk=obj.pk).status == VServerStatusChoices.STATUS_DELETING
        assert Operation.objects.filter(vserver=obj,
                                        kind=OperationKindChoices.KIND_DELETE).exists()


class TestSSHKeyAPI(APIViewTestCase):
    """/vservers/{id}/ssh-keys/: the vserver in the URL is the tenant gate."""

    basename = "vserver-ssh-key"
    model = SSHKey
    operations = frozenset({"create", "delete"})
    nested = True
    create_other_status = 404
    search_term = "key"

    def parent(self, world: World) -> VServer:
        if "keys-vserver" not in world.cache:
            world.cache["keys-vserver"] = make_vserver(world.customer, world.host)
        vs: VServer = world.cache["keys-vserver"]
        return vs

    def make_object(self, world: World) -> SSHKey:
        vs = self.parent(world)
        return SSHKey.objects.create(vserver=vs, name=f"key{vs.ssh_keys.count()}", key=KEY)

    def create_payload(self, world: World) -> dict[str, Any]:
        return {"name": "laptop", "key": KEY}

    def list_url(self, world: World, obj: Any = None) -> str:
        return reverse("vserver-ssh-key-list", args=[self.parent(world).pk])

    def detail_url(self, obj: Any, pk: Any = None) -> str:
        return reverse("vserver-ssh-key-detail", args=[obj.vserver_id,
                                                       obj.pk if pk is None else pk])

    def missing_url(self, obj: Any, suffix: str = "detail") -> str:
        # A missing vserver: the other tenant's request must look just like this.
        return reverse("vserver-ssh-key-detail", args=[987_654_321, obj.pk])


class TestOperationAPI(APIViewTestCase):
    basename = "operation"
    model = Operation
    operations = frozenset()
    search_term = "vs"

    def make_object(self, world: World) -> Operation:
        vs = make_vserver(world.customer, world.host)
        return Operation.objects.create(vserver=vs, vserver_name=vs.name, customer=vs.customer,
                                        kind=OperationKindChoices.KIND_START)
