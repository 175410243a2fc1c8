"""Viewsets of the hosting app's API: a queryset, a serializer and a filterset each.

Tenant objects come through their model's `visible_to(user)`; platform objects
(hosts, IP pools, addresses) are staff-only. Memberships and tokens change
through panel/hosting/actions.py; staff edits of plain records (customers,
plans, hosts, pools) are saved by the serializer and written to the audit log.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import (
    Count,
    DecimalField,
    IntegerField,
    OuterRef,
    Prefetch,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from panel.guests.actions import ActionError, audit
from panel.guests.models import VServer
from panel.hosting import actions, filtersets
from panel.hosting.api import schema  # noqa: F401  (registers the token scheme)
from panel.hosting.api import serializers as s
from panel.hosting.api.base import (
    IsStaff,
    StaffWritesOthersRead,
    VPanelModelViewSet,
    VPanelReadOnlyModelViewSet,
)
from panel.hosting.choices import RoleChoices
from panel.hosting.models import (
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
    "ApiTokenViewSet",
    "AuditLogViewSet",
    "CustomerViewSet",
    "HostViewSet",
    "IPAddressViewSet",
    "IPPoolViewSet",
    "MembershipViewSet",
    "PlanViewSet",
]


class AuditedWritesMixin:
    """Staff edits of plain records: saved by the serializer, recorded in the audit log."""

    def _audit(self, obj: Any, verb: str, **detail: Any) -> None:
        customer = obj if isinstance(obj, Customer) else getattr(obj, "customer", None)
        if verb == "delete" and isinstance(obj, Customer):
            customer = None  # gone: the row names it in target_repr
        audit(self.actor(), customer, obj,  # type: ignore[attr-defined]
              f"{verb}-{type(obj).__name__.lower()}", **detail)

    def perform_create(self, serializer: Any) -> None:
        with transaction.atomic():
            obj = serializer.save()
            self._audit(obj, "create", fields=sorted(serializer.validated_data))

    def perform_update(self, serializer: Any) -> None:
        with transaction.atomic():
            obj = serializer.save()
            self._audit(obj, "update", fields=sorted(serializer.validated_data))

    def perform_destroy(self, instance: Any) -> None:
        with transaction.atomic():
            pk = instance.pk
            instance.delete()
            instance.pk = pk  # so the audit row names what was deleted
            self._audit(instance, "delete")


# --- plans and customers ------------------------------------------------------------------

class PlanViewSet(AuditedWritesMixin, VPanelModelViewSet):
    """Plans: everyone reads the plans of their customers; staff write."""

    queryset = Plan.objects.all()
    serializer_class = s.PlanSerializer
    filterset_class = filtersets.PlanFilterSet
    permission_classes = [StaffWritesOthersRead]
    ordering_fields = ["id", "name", "max_vservers", "memory_mb", "disk_gb"]
    search_fields = ["name", "description"]

    def get_queryset(self) -> QuerySet[Plan]:
        return Plan.objects.visible_to(self.request.user)


def _usage() -> dict[str, Any]:
    """What each customer's vservers take, as subqueries: one query for any number of rows."""
    vservers = VServer.objects.filter(customer=OuterRef("pk")).order_by().values("customer")
    ips = IPAddress.objects.filter(vserver__customer=OuterRef("pk")).order_by() \
        .values("vserver__customer")

    def total(qs: QuerySet[Any], expr: Any, output: Any, zero: Any = 0) -> Coalesce:
        return Coalesce(Subquery(qs.annotate(t=expr).values("t")), Value(zero),
                        output_field=output)

    # IPv6 is told from IPv4 as panel/guests/actions.py's plan check tells them: by the ':'.
    return {
        "usage_vservers": total(vservers, Count("id"), IntegerField()),
        "usage_memory_mb": total(vservers, Sum("memory_mb"), IntegerField()),
        "usage_cpu_cores": total(vservers, Sum("cpu_cores"),
                                 DecimalField(max_digits=8, decimal_places=2), Decimal(0)),
        "usage_disk_gb": total(vservers, Sum("disk_gb"), IntegerField()),
        "usage_ipv4": total(ips.exclude(address__contains=":"), Count("id"), IntegerField()),
        "usage_ipv6": total(ips.filter(address__contains=":"), Count("id"), IntegerField()),
    }


class CustomerViewSet(AuditedWritesMixin, VPanelModelViewSet):
    """Customers: members read their own, with limits and usage; staff manage all."""

    serializer_class = s.CustomerSerializer
    filterset_class = filtersets.CustomerFilterSet
    permission_classes = [StaffWritesOthersRead]
    ordering_fields = ["id", "name", "slug", "created"]
    search_fields = ["name", "slug"]

    def get_queryset(self) -> QuerySet[Customer]:
        user = self.request.user
        mine = Membership.objects.filter(user=user) if user.is_authenticated \
            else Membership.objects.none()
        return (Customer.objects.visible_to(user).select_related("plan")
                .annotate(**_usage())
                .prefetch_related(Prefetch("memberships", queryset=mine,
                                           to_attr="my_memberships")))

    def perform_create(self, serializer: Any) -> None:
        super().perform_create(serializer)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)

    def perform_update(self, serializer: Any) -> None:
        super().perform_update(serializer)
        serializer.instance = self.get_queryset().get(pk=serializer.instance.pk)


@extend_schema_view(partial_update=extend_schema(request=s.MembershipUpdateSerializer,
                                                 responses=s.MembershipSerializer))
class MembershipViewSet(VPanelModelViewSet):
    """Who belongs to which customer, in which role: owners manage their customer's."""

    serializer_class = s.MembershipSerializer
    filterset_class = filtersets.MembershipFilterSet
    ordering_fields = ["id", "role", "user__username", "customer__name"]
    search_fields = ["user__username", "customer__name"]

    def get_queryset(self) -> QuerySet[Membership]:
        return Membership.objects.visible_to(self.request.user) \
            .select_related("user", "customer").order_by("customer__name", "user__username")

    def perform_create(self, serializer: Any) -> None:
        d = serializer.validated_data
        serializer.instance = actions.add_member(
            d["customer"], actor=self.actor(), user=d["user"],
            role=d.get("role", RoleChoices.ROLE_MEMBER))

    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        m = self.get_object()
        data = s.MembershipUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        if "role" in data.validated_data:
            m = actions.set_member_role(m, actor=self.actor(),
                                        role=data.validated_data["role"])
        return Response(s.MembershipSerializer(m, context=self.get_serializer_context()).data)

    def perform_destroy(self, instance: Membership) -> None:
        actions.remove_member(instance, actor=self.actor())


# --- platform: staff only --------------------------------------------------------------------

class HostViewSet(AuditedWritesMixin, VPanelModelViewSet):
    queryset = Host.objects.annotate(vserver_count=Count("vservers"))
    serializer_class = s.HostSerializer
    filterset_class = filtersets.HostFilterSet
    permission_classes = [IsStaff]
    ordering_fields = ["id", "name", "state", "last_seen", "vserver_count"]
    search_fields = ["name", "agent_socket"]


class IPPoolViewSet(AuditedWritesMixin, VPanelModelViewSet):
    queryset = IPPool.objects.annotate(used=Count("addresses"))
    serializer_class = s.IPPoolSerializer
    filterset_class = filtersets.IPPoolFilterSet
    permission_classes = [IsStaff]
    ordering_fields = ["id", "name", "family", "network", "used"]
    search_fields = ["name", "network"]


class IPAddressViewSet(VPanelReadOnlyModelViewSet):
    """Handed out by the vserver actions only; customers see theirs on their vservers."""

    queryset = IPAddress.objects.select_related("pool", "vserver")
    serializer_class = s.IPAddressSerializer
    filterset_class = filtersets.IPAddressFilterSet
    permission_classes = [IsStaff]
    ordering_fields = ["id", "address", "allocated", "pool"]
    search_fields = ["address", "vserver__name"]


# --- audit ------------------------------------------------------------------------------

class AuditLogViewSet(VPanelReadOnlyModelViewSet):
    serializer_class = s.AuditLogSerializer
    filterset_class = filtersets.AuditLogFilterSet
    ordering_fields = ["id", "time", "action", "actor_name"]
    search_fields = ["action", "target_repr", "actor_name"]

    def get_queryset(self) -> QuerySet[AuditLog]:
        return AuditLog.objects.visible_to(self.request.user).select_related("customer")


# --- API tokens ----------------------------------------------------------------------------

@extend_schema_view(
    create=extend_schema(request=s.ApiTokenCreateSerializer,
                         responses={201: s.NewApiTokenSerializer}),
    destroy=extend_schema(description="Revoke the token (it stays listed, with the time)."),
)
class ApiTokenViewSet(VPanelModelViewSet):
    """The requesting user's own tokens. The secret is in the create answer only."""

    serializer_class = s.ApiTokenSerializer
    filterset_class = filtersets.ApiTokenFilterSet
    http_method_names = ["get", "post", "delete", "head", "options"]
    # Never the digest: ordering by it would leak it a bit at a time.
    ordering_fields = ["id", "name", "created", "expires", "last_used"]
    search_fields = ["name", "prefix"]

    def get_queryset(self) -> QuerySet[ApiToken]:
        user = self.request.user
        if not user.is_authenticated:
            return ApiToken.objects.none()
        return ApiToken.objects.filter(user=user)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = s.ApiTokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        expires = data.validated_data.get("expires")
        via = request.auth if isinstance(request.auth, ApiToken) else None
        if via is not None and via.expires is not None \
                and (expires is None or expires > via.expires):
            # A leaked token must not be able to mint itself a longer life.
            raise ActionError(f"a token can only make tokens that expire no later than itself "
                              f"({via.expires.isoformat()})", "expires")
        token, secret = actions.issue_token(actor=self.actor(),
                                            name=data.validated_data["name"], expires=expires)
        body = s.NewApiTokenSerializer(token, context={"secret": secret}).data
        return Response(body, status=status.HTTP_201_CREATED,
                        headers={"Cache-Control": "no-store"})

    def perform_destroy(self, instance: ApiToken) -> None:
        actions.revoke_token(instance, actor=self.actor())
