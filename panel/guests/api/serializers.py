"""Serializers of the guests app's API.

The vserver's representation is read-only as a whole: what a client may ask
for is declared by the create and update serializers, which name only the
fields a customer chooses (name, hostname, template, limits within the plan,
capabilities and flags within the plan). Customer (on create: one the user
may see; the action checks the role), host, IPs, status, context and the
desired state are never taken from a request: a field not declared here is
ignored, so it can never be written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from decimal import Decimal
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from panel.guests.models import Operation, SSHKey, VServer, hostname_validator, name_validator
from panel.hosting.api.base import VisibleRelatedField
from panel.hosting.models import Customer, IPAddress

__all__ = [
    "ConfirmSerializer",
    "OperationSerializer",
    "PasswordResetSerializer",
    "ReinstallSerializer",
    "SSHKeyCreateSerializer",
    "SSHKeySerializer",
    "StopSerializer",
    "VServerCreateSerializer",
    "VServerOperationSerializer",
    "VServerOperationsSerializer",
    "VServerSerializer",
    "VServerUpdateSerializer",
]

# The limit fields a PATCH may change (through actions.set_limits).
LIMIT_FIELDS = ("memory_mb", "cpu_cores", "processes", "disk_gb")


class VServerIPSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    family = serializers.IntegerField(source="pool.family", read_only=True)
    prefixlen = serializers.SerializerMethodField()
    gateway = serializers.IPAddressField(source="pool.gateway", read_only=True, allow_null=True)

    class Meta:
        model = IPAddress
        fields = ["address", "family", "prefixlen", "gateway"]
        read_only_fields = fields

    def get_prefixlen(self, obj: IPAddress) -> int:
        return obj.pool.prefixlen()


class VServerSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    customer_name = serializers.CharField(source="customer.name", read_only=True)
    host = serializers.CharField(source="host.name", read_only=True,
                                 help_text="the host it runs on (chosen by the panel)")
    ips = VServerIPSerializer(many=True, read_only=True)
    status_display = serializers.CharField(source="get_status_display", read_only=True)
    busy = serializers.BooleanField(read_only=True,
                                    help_text="an operation is under way: wait for it")

    class Meta:
        model = VServer
        fields = ["id", "name", "customer", "customer_name", "host", "template", "hostname",
                  "description", "capabilities", "flags", "nice", "memory_mb", "cpu_cores",
                  "processes", "disk_gb", "onboot", "desired_state", "status",
                  "status_display", "status_message", "status_updated", "busy", "context_id",
                  "ips", "created", "updated"]
        read_only_fields = fields


def _limits(**defaults: Any) -> dict[str, serializers.Field]:  # type: ignore[type-arg]
    """The limit fields: with DEFAULTS on create, optional on update."""

    def kw(name: str) -> dict[str, Any]:
        return {"default": defaults[name]} if defaults else {"required": False}

    return {
        "memory_mb": serializers.IntegerField(min_value=16, help_text="MiB", **kw("memory_mb")),
        "cpu_cores": serializers.DecimalField(max_digits=6, decimal_places=2,
                                              min_value=Decimal("0.05"), **kw("cpu_cores")),
        "processes": serializers.IntegerField(min_value=8, help_text="per vserver",
                                              **kw("processes")),
        "disk_gb": serializers.IntegerField(min_value=1, help_text="GiB", **kw("disk_gb")),
    }


class VServerCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A new vserver: what to build, within the customer's plan (checked by the action)."""

    customer = VisibleRelatedField(queryset=Customer.objects.all(),
                                   help_text="a customer you are owner or admin of")
    name = serializers.CharField(max_length=31, validators=[name_validator])
    hostname = serializers.CharField(max_length=64, required=False, allow_blank=True,
                                     validators=[hostname_validator],
                                     help_text="empty: the name")
    template = serializers.CharField(max_length=31, required=False, allow_blank=True,
                                     help_text="empty: busybox")
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    memory_mb, cpu_cores, processes, disk_gb = _limits(
        memory_mb=256, cpu_cores=Decimal(1), processes=128, disk_gb=1).values()
    ipv4 = serializers.IntegerField(min_value=0, max_value=64, default=1,
                                    help_text="how many IPv4 addresses to allocate")
    ipv6 = serializers.IntegerField(min_value=0, max_value=64, default=0,
                                    help_text="how many IPv6 addresses to allocate")
    capabilities = serializers.ListField(child=serializers.CharField(max_length=32),
                                         required=False, max_length=64)
    flags = serializers.ListField(child=serializers.CharField(max_length=32), required=False,
                                  max_length=64)
    nice = serializers.IntegerField(required=False, allow_null=True,
                                    validators=[MinValueValidator(-20), MaxValueValidator(19)])
    onboot = serializers.BooleanField(default=True)


class VServerUpdateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """What a PATCH may change: the hostname and the limits (within the plan)."""

    hostname = serializers.CharField(max_length=64, required=False,
                                     validators=[hostname_validator])
    memory_mb, cpu_cores, processes, disk_gb = _limits().values()


class OperationSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    created_by = serializers.CharField(source="created_by.username", read_only=True,
                                       default=None)
    result = serializers.SerializerMethodField()
    done = serializers.BooleanField(read_only=True)

    class Meta:
        model = Operation
        fields = ["id", "vserver", "vserver_name", "customer", "kind", "state", "progress",
                  "message", "result", "error", "created_by", "created", "updated", "done"]
        read_only_fields = fields

    @extend_schema_field({"type": "object", "nullable": True, "additionalProperties": True})
    def get_result(self, obj: Operation) -> dict[str, Any] | None:
        # A pending password reset holds the new hash until the agent has used it.
        if obj.result is None:
            return None
        return {k: v for k, v in obj.result.items() if "password" not in k}


class VServerOperationSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The answer to an accepted action: the vserver as it is now and the operation to follow."""

    vserver = VServerSerializer()
    operation = OperationSerializer()


class VServerOperationsSerializer(serializers.Serializer):  # type: ignore[type-arg]
    vserver = VServerSerializer()
    operations = OperationSerializer(many=True)


class PasswordResetSerializer(VServerOperationSerializer):
    password = serializers.CharField(help_text="the new root password: shown this once")


class StopSerializer(serializers.Serializer):  # type: ignore[type-arg]
    force = serializers.BooleanField(default=False,
                                     help_text="kill at once instead of a clean shutdown")


class ConfirmSerializer(serializers.Serializer):  # type: ignore[type-arg]
    confirm = serializers.CharField(help_text="the vserver's name, to confirm")


class ReinstallSerializer(ConfirmSerializer):
    template = serializers.CharField(max_length=31, required=False, allow_blank=True,
                                     allow_null=True,
                                     help_text="absent or null: the same; empty: busybox")


def fingerprint(key: str) -> str | None:
    """OpenSSH's SHA256 fingerprint of a public key line."""
    parts = key.split()
    if len(parts) < 2:
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class SSHKeySerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    fingerprint = serializers.SerializerMethodField()

    class Meta:
        model = SSHKey
        fields = ["id", "vserver", "name", "key", "fingerprint", "created"]
        read_only_fields = fields

    def get_fingerprint(self, obj: SSHKey) -> str | None:
        return fingerprint(obj.key)


class SSHKeyCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = serializers.CharField(max_length=64)
    key = serializers.CharField(max_length=16384, help_text="one OpenSSH public key line")
