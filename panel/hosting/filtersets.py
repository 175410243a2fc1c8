"""Filters of the hosting app's lists (django-filter), for the API and the pages.

A filter that names a tenant's object chooses among `visible_to(request.user)`
only: another tenant's id is refused exactly like a missing one, so a filter
cannot be used to learn which ids exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import django_filters
from django.db.models import Q, QuerySet
from django.utils import timezone

from panel.hosting.choices import AuditResultChoices, HostStateChoices, IPFamilyChoices, RoleChoices
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
    "ApiTokenFilterSet",
    "AuditLogFilterSet",
    "CustomerFilterSet",
    "HostFilterSet",
    "IPAddressFilterSet",
    "IPPoolFilterSet",
    "MembershipFilterSet",
    "PlanFilterSet",
    "visible",
]


def visible(model: Any) -> Callable[[Any], QuerySet[Any]]:
    """A filter queryset: the objects of MODEL the requesting user may see."""

    def queryset(request: Any) -> QuerySet[Any]:
        return model.objects.visible_to(getattr(request, "user", None))

    return queryset


class PlanFilterSet(django_filters.FilterSet):
    class Meta:
        model = Plan
        fields = {"name": ["exact", "icontains"], "console_allowed": ["exact"]}


class CustomerFilterSet(django_filters.FilterSet):
    plan = django_filters.ModelChoiceFilter(queryset=visible(Plan))
    kind = django_filters.ChoiceFilter(choices=Customer._meta.get_field("kind").choices)

    class Meta:
        model = Customer
        fields = {"name": ["exact", "icontains"], "slug": ["exact"], "is_active": ["exact"]}


class MembershipFilterSet(django_filters.FilterSet):
    customer = django_filters.ModelChoiceFilter(queryset=visible(Customer))
    user = django_filters.CharFilter(field_name="user__username")
    role = django_filters.ChoiceFilter(choices=RoleChoices.choices)

    class Meta:
        model = Membership
        fields = ["customer", "user", "role"]


class HostFilterSet(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=HostStateChoices.choices)

    class Meta:
        model = Host
        fields = {"name": ["exact", "icontains"]}


class IPPoolFilterSet(django_filters.FilterSet):
    family = django_filters.ChoiceFilter(choices=IPFamilyChoices.choices)
    host = django_filters.ModelChoiceFilter(queryset=Host.objects.all())

    class Meta:
        model = IPPool
        fields = {"name": ["exact", "icontains"]}


class IPAddressFilterSet(django_filters.FilterSet):
    pool = django_filters.ModelChoiceFilter(queryset=IPPool.objects.all())
    family = django_filters.ChoiceFilter(choices=IPFamilyChoices.choices,
                                         field_name="pool__family")
    vserver = django_filters.NumberFilter(field_name="vserver_id")
    assigned = django_filters.BooleanFilter(field_name="vserver", lookup_expr="isnull",
                                            exclude=True)

    class Meta:
        model = IPAddress
        fields = {"address": ["exact", "startswith"]}


class AuditLogFilterSet(django_filters.FilterSet):
    customer = django_filters.ModelChoiceFilter(queryset=visible(Customer))
    result = django_filters.ChoiceFilter(choices=AuditResultChoices.choices)
    since = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="lt")

    class Meta:
        model = AuditLog
        fields = {"action": ["exact"], "target_type": ["exact"], "target_id": ["exact"],
                  "actor_name": ["exact"]}


class ApiTokenFilterSet(django_filters.FilterSet):
    active = django_filters.BooleanFilter(method="filter_active",
                                          label="not revoked and not expired")

    class Meta:
        model = ApiToken
        fields = {"name": ["exact", "icontains"]}

    def filter_active(self, queryset: QuerySet[ApiToken], name: str,
                      value: bool | None) -> QuerySet[ApiToken]:
        if value is None:
            return queryset
        live = Q(revoked__isnull=True) & (Q(expires__isnull=True) | Q(expires__gt=timezone.now()))
        return queryset.filter(live) if value else queryset.exclude(live)
