"""Filters of the guests app's lists (django-filter), for the API and the pages.

As in panel/hosting/filtersets.py, a filter naming a tenant's object chooses
among `visible_to(request.user)` only.
"""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from panel.guests.choices import (
    DesiredStateChoices,
    OperationKindChoices,
    OperationStateChoices,
    VServerStatusChoices,
)
from panel.guests.models import Operation, SSHKey, VServer
from panel.hosting.filtersets import visible
from panel.hosting.models import Customer

__all__ = ["OperationFilterSet", "SSHKeyFilterSet", "VServerFilterSet"]

_DONE = (OperationStateChoices.STATE_SUCCESS, OperationStateChoices.STATE_FAILURE,
         OperationStateChoices.STATE_CANCELLED)


class VServerFilterSet(django_filters.FilterSet):
    customer = django_filters.ModelChoiceFilter(queryset=visible(Customer))
    host = django_filters.CharFilter(field_name="host__name", label="host name")
    status = django_filters.MultipleChoiceFilter(choices=VServerStatusChoices.choices)
    desired_state = django_filters.ChoiceFilter(choices=DesiredStateChoices.choices)
    ip = django_filters.CharFilter(field_name="ips__address", distinct=True,
                                   label="an address of the vserver")

    class Meta:
        model = VServer
        fields = {"name": ["exact", "icontains"], "hostname": ["exact", "icontains"],
                  "template": ["exact"], "onboot": ["exact"]}


class OperationFilterSet(django_filters.FilterSet):
    vserver = django_filters.ModelChoiceFilter(queryset=visible(VServer))
    customer = django_filters.ModelChoiceFilter(queryset=visible(Customer))
    kind = django_filters.MultipleChoiceFilter(choices=OperationKindChoices.choices)
    state = django_filters.MultipleChoiceFilter(choices=OperationStateChoices.choices)
    done = django_filters.BooleanFilter(method="filter_done", label="finished (any end state)")

    class Meta:
        model = Operation
        fields = ["vserver", "customer", "kind", "state", "vserver_name"]

    def filter_done(self, queryset: QuerySet[Operation], name: str,
                    value: bool | None) -> QuerySet[Operation]:
        if value is None:
            return queryset
        return queryset.filter(state__in=_DONE) if value else queryset.exclude(state__in=_DONE)


class SSHKeyFilterSet(django_filters.FilterSet):
    class Meta:
        model = SSHKey
        fields = {"name": ["exact", "icontains"]}
