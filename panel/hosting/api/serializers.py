"""Serializers of the hosting app's API.

Fields a role may not change are read-only here (a customer's plan and limits
for non-staff are refused by the permission; a membership's customer and user
once made; a token's everything but its name at creation). The token's digest
is never a field; its secret appears in the create answer only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from panel.hosting.api.base import ValidatedModelSerializer, VisibleRelatedField
from panel.hosting.choices import RoleChoices
from panel.hosting.models import (
    PLAN_LIMIT_FIELDS,
    ApiToken,
    AuditLog,
    Customer,
    Host,
    IPAddress,
    IPPool,
    Membership,
    Plan,
)

__all__ = [
    "ApiTokenCreateSerializer",
    "ApiTokenSerializer",
    "AuditLogSerializer",
    "CustomerSerializer",
    "HostSerializer",
    "IPAddressSerializer",
    "IPPoolSerializer",
    "MembershipSerializer",
    "MembershipUpdateSerializer",
    "NewApiTokenSerializer",
    "PlanSerializer",
]


# --- plans and customers ------------------------------------------------------------------

class PlanSerializer(ValidatedModelSerializer):
    class Meta:
        model = Plan
        fields = ["id", "name", "description", *PLAN_LIMIT_FIELDS, "allowed_caps",
                  "allowed_flags", "console_allowed", "templates"]


class PlanLimitsSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A plan's limits with the customer's overrides applied (read-only)."""

    max_vservers = serializers.IntegerField()
    max_ipv4 = serializers.IntegerField()
    max_ipv6 = serializers.IntegerField()
    memory_mb = serializers.IntegerField()
    cpu_cores = serializers.DecimalField(max_digits=6, decimal_places=2)
    disk_gb = serializers.IntegerField()
    processes = serializers.IntegerField()
    allowed_caps = serializers.ListField(child=serializers.CharField())
    allowed_flags = serializers.ListField(child=serializers.CharField())
    console_allowed = serializers.BooleanField()


class UsageSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """What a customer's vservers take, to set against its limits."""

    max_vservers = serializers.IntegerField(source="usage_vservers")
    max_ipv4 = serializers.IntegerField(source="usage_ipv4")
    max_ipv6 = serializers.IntegerField(source="usage_ipv6")
    memory_mb = serializers.IntegerField(source="usage_memory_mb")
    cpu_cores = serializers.DecimalField(max_digits=8, decimal_places=2,
                                         source="usage_cpu_cores")
    disk_gb = serializers.IntegerField(source="usage_disk_gb")


class CustomerSerializer(ValidatedModelSerializer):
    plan = VisibleRelatedField(queryset=Plan.objects.all(), allow_null=True, required=False)
    plan_name = serializers.CharField(source="plan.name", read_only=True, default=None)
    limits = serializers.SerializerMethodField()
    usage = serializers.SerializerMethodField()
    my_role = serializers.SerializerMethodField(
        help_text="the requesting user's role in this customer (null: none, e.g. staff)")

    class Meta:
        model = Customer
        fields = ["id", "name", "slug", "kind", "plan", "plan_name",
                  *(f"override_{f}" for f in PLAN_LIMIT_FIELDS), "is_active", "created",
                  "limits", "usage", "my_role"]
        read_only_fields = ["created"]

    @extend_schema_field(PlanLimitsSerializer)
    def get_limits(self, obj: Customer) -> dict[str, Any]:
        return dict(PlanLimitsSerializer(obj.limits()).data)

    @extend_schema_field(UsageSerializer)
    def get_usage(self, obj: Customer) -> dict[str, Any] | None:
        if not hasattr(obj, "usage_vservers"):  # a fresh object, not from the list queryset
            return None
        return dict(UsageSerializer(obj).data)

    @extend_schema_field(serializers.ChoiceField(choices=RoleChoices.choices, allow_null=True))
    def get_my_role(self, obj: Customer) -> str | None:
        mine = getattr(obj, "my_memberships", None)
        if mine is None:
            return None
        return mine[0].role if mine else None


class MembershipSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    customer = VisibleRelatedField(queryset=Customer.objects.all())
    customer_name = serializers.CharField(source="customer.name", read_only=True)
    user = serializers.SlugRelatedField(slug_field="username",
                                        queryset=get_user_model().objects.filter(is_active=True))

    class Meta:
        model = Membership
        fields = ["id", "customer", "customer_name", "user", "role"]
        # The one-membership constraint is the action's to check, with its message.
        validators: list[Any] = []


class MembershipUpdateSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    """A membership's role is all that changes; customer and user stay as made."""

    class Meta:
        model = Membership
        fields = ["role"]


# --- platform ------------------------------------------------------------------------------

class HostSerializer(ValidatedModelSerializer):
    vserver_count = serializers.IntegerField(read_only=True, default=0)

    class Meta:
        model = Host
        fields = ["id", "name", "agent_socket", "state", "max_vservers", "memory_mb", "cpu_cores",
                  "disk_gb", "iprootdev", "last_seen", "last_error", "vserver_count"]
        read_only_fields = ["last_seen", "last_error"]


class IPPoolSerializer(ValidatedModelSerializer):
    host = serializers.PrimaryKeyRelatedField(queryset=Host.objects.all(), allow_null=True,
                                              required=False)
    used = serializers.IntegerField(read_only=True, default=0)

    class Meta:
        model = IPPool
        fields = ["id", "name", "host", "family", "network", "first", "last", "gateway",
                  "reserved", "used"]


class IPAddressSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    family = serializers.IntegerField(source="pool.family", read_only=True)
    pool_name = serializers.CharField(source="pool.name", read_only=True)
    vserver_name = serializers.CharField(source="vserver.name", read_only=True, default=None)

    class Meta:
        model = IPAddress
        fields = ["id", "address", "family", "pool", "pool_name", "vserver", "vserver_name",
                  "allocated"]
        read_only_fields = fields


# --- audit ---------------------------------------------------------------------------------

class AuditLogSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    customer_name = serializers.CharField(source="customer.name", read_only=True, default=None)

    class Meta:
        model = AuditLog
        fields = ["id", "time", "actor", "actor_name", "customer", "customer_name",
                  "target_type", "target_id", "target_repr", "source_ip", "action", "result",
                  "detail"]
        read_only_fields = fields


# --- API tokens ----------------------------------------------------------------------------

class ApiTokenSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    active = serializers.BooleanField(source="is_valid", read_only=True)

    class Meta:
        model = ApiToken
        # Never the digest: what is stored stays on the server.
        fields = ["id", "name", "prefix", "created", "expires", "last_used", "revoked",
                  "active"]
        read_only_fields = fields


class ApiTokenCreateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    name = serializers.CharField(max_length=64)
    expires = serializers.DateTimeField(required=False, allow_null=True,
                                        help_text="when the token stops working; null: never")

    def validate_expires(self, value: datetime | None) -> datetime | None:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("the expiry must be in the future")
        return value


class NewApiTokenSerializer(ApiTokenSerializer):
    secret = serializers.SerializerMethodField(
        help_text="the token's secret: shown in this answer only, never again")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "secret"]
        read_only_fields = fields

    def get_secret(self, obj: ApiToken) -> str:
        return str(self.context["secret"])
