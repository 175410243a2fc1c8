"""Django admin for staff: plans, customers (with their members), hosts, IP pools,
API tokens and the audit log.

The audit log is read-only here (no add, change or delete), as it is
append-only everywhere. Token secrets are never stored, so tokens are made on
the account page or through the API, where the secret can be shown once;
here they can be seen and revoked.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from panel.guests.actions import audit
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
from panel.hosting.views import actor_of


class _ReadOnly(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "max_vservers", "memory_mb", "cpu_cores", "disk_gb", "max_ipv4",
                    "max_ipv6", "processes", "console_allowed"]
    search_fields = ["name", "description"]


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "slug", "kind", "plan", "is_active", "created"]
    list_filter = ["kind", "is_active", "plan"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["user", "customer", "role"]
    list_filter = ["role"]
    search_fields = ["user__username", "customer__name"]
    autocomplete_fields = ["user", "customer"]


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "state", "agent_socket", "max_vservers", "memory_mb", "cpu_cores",
                    "disk_gb", "last_seen"]
    list_filter = ["state"]
    search_fields = ["name"]
    readonly_fields = ["last_seen", "last_error"]


class IPAddressInline(admin.TabularInline):  # type: ignore[type-arg]
    """Addresses are handed out by the vserver actions; here they are only listed."""

    model = IPAddress
    extra = 0
    readonly_fields = ["address", "vserver", "allocated"]
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(IPPool)
class IPPoolAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "family", "network", "first", "last", "host"]
    list_filter = ["family", "host"]
    search_fields = ["name", "network"]
    inlines = [IPAddressInline]


@admin.register(IPAddress)
class IPAddressAdmin(_ReadOnly):
    list_display = ["address", "pool", "vserver", "allocated"]
    list_filter = ["pool"]
    search_fields = ["address", "vserver__name"]


@admin.register(AuditLog)
class AuditLogAdmin(_ReadOnly):
    list_display = ["time", "actor_name", "customer", "action", "target_repr", "result",
                    "source_ip"]
    list_filter = ["result", "action", "target_type"]
    search_fields = ["actor_name", "target_repr", "action", "customer__name"]
    date_hierarchy = "time"


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "user", "prefix", "created", "expires", "last_used", "revoked"]
    list_filter = ["revoked"]
    search_fields = ["name", "prefix", "user__username"]
    # Never the digest: what authenticates stays out of pages.
    fields = ["user", "name", "prefix", "created", "expires", "last_used", "revoked"]
    readonly_fields = fields
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        # actions.revoke_token is for a token's owner; staff revoke here, audited as such.
        actor, n = actor_of(request), 0
        for token in queryset.filter(revoked__isnull=True):
            with transaction.atomic():
                if ApiToken.objects.filter(pk=token.pk, revoked__isnull=True).update(
                        revoked=timezone.now()):
                    audit(actor, None, token, "revoke-api-token", by_staff=True)
                    n += 1
        self.message_user(request, f"{n} token(s) revoked.")
