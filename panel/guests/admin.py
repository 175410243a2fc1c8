"""Django admin for staff: vservers, their operations and SSH keys, to look at.

Read-only on purpose: every change to a vserver goes through
panel/guests/actions.py, which checks the plan, audits and hands the work to
the host's agent (STYLE.md: the admin never saves lifecycle state). The
vserver's page in the panel has the buttons.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from panel.guests.models import Operation, SSHKey, VServer


class _ReadOnly(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class SSHKeyInline(admin.TabularInline):  # type: ignore[type-arg]
    model = SSHKey
    extra = 0
    fields = ["name", "key", "created"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(VServer)
class VServerAdmin(_ReadOnly):
    list_display = ["name", "customer", "host", "status", "desired_state", "memory_mb",
                    "cpu_cores", "disk_gb", "panel_page"]
    list_filter = ["status", "desired_state", "host", "customer"]
    search_fields = ["name", "hostname", "customer__name"]
    inlines = [SSHKeyInline]

    @admin.display(description="panel")
    def panel_page(self, obj: VServer) -> SafeString:
        return format_html('<a href="{}">actions</a>', reverse("vserver_detail", args=[obj.pk]))


@admin.register(Operation)
class OperationAdmin(_ReadOnly):
    list_display = ["created", "vserver_name", "kind", "state", "progress", "created_by",
                    "message"]
    list_filter = ["state", "kind"]
    search_fields = ["vserver_name", "message", "error"]
    # The result may hold a password hash (reset-password): never shown.
    exclude = ["result"]


@admin.register(SSHKey)
class SSHKeyAdmin(_ReadOnly):
    list_display = ["name", "vserver", "created"]
    search_fields = ["name", "vserver__name"]
