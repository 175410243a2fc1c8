"""What every viewset of the API shares (NetBox's netbox/api/): the base viewset,
the permissions, the validated model serializer and the tenant-gated related field.

- An action's `ActionError` answers 400 `{"detail": message, "field": field,
  <field>: [message]}` (the last part is the field-keyed form DRF clients read),
  `Denied` answers 403, a protected object's deletion 409.
- Objects come from `get_queryset()`, which goes through the model's
  `visible_to(user)`: another tenant's object is missing, so it answers 404.
"""

from __future__ import annotations

import copy
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import ProtectedError
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.exceptions import APIException, PermissionDenied
from rest_framework.fields import get_error_detail
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import set_rollback

from panel.guests.actions import ActionError, Actor, Denied

__all__ = [
    "IsStaff",
    "Pagination",
    "StaffWritesOthersRead",
    "VPanelModelViewSet",
    "VPanelReadOnlyModelViewSet",
    "VPanelViewSetMixin",
    "ValidatedModelSerializer",
    "VisibleRelatedField",
    "action_error_body",
    "actor_of",
]


# --- errors ---------------------------------------------------------------------------

class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "the object is still in use"
    default_code = "conflict"


def action_error_body(exc: ActionError) -> dict[str, Any]:
    key = exc.field or serializers.api_settings.NON_FIELD_ERRORS_KEY
    return {"detail": exc.message, "field": exc.field, key: [exc.message]}


def actor_of(request: Request) -> Actor:
    """Who acts, from where (the pages' rule: REMOTE_ADDR, or the address the
    provider's own proxies appended; hosting.views.source_ip)."""
    from panel.hosting.views import source_ip

    return Actor(request.user, source_ip(request))


class VPanelViewSetMixin:
    """Maps the actions' errors onto HTTP answers."""

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, Denied):
            exc = PermissionDenied(exc.message)
        elif isinstance(exc, ActionError):
            set_rollback()
            return Response(action_error_body(exc), status=status.HTTP_400_BAD_REQUEST)
        elif isinstance(exc, DjangoValidationError):
            exc = serializers.ValidationError(get_error_detail(exc))
        elif isinstance(exc, ProtectedError):
            names = sorted({str(o) for o in exc.protected_objects})[:10]
            exc = Conflict(f"still in use by: {', '.join(names)}")
        return super().handle_exception(exc)  # type: ignore[misc]

    def actor(self) -> Actor:
        return actor_of(self.request)  # type: ignore[attr-defined]


class Pagination(LimitOffsetPagination):
    """?limit=&offset= (50 by default, settings.PAGE_SIZE), and never more than 1000 rows
    in one answer, however large the limit asked."""

    max_limit = 1000


class VPanelModelViewSet(VPanelViewSetMixin, viewsets.ModelViewSet):  # type: ignore[misc]
    pagination_class = Pagination
    # PUT would have clients send read-only fields back; PATCH says what changes.
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]


class VPanelReadOnlyModelViewSet(VPanelViewSetMixin,  # type: ignore[misc]
                                 viewsets.ReadOnlyModelViewSet):
    pagination_class = Pagination


# --- permissions ---------------------------------------------------------------------------

def _staff(request: Request) -> bool:
    return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class IsStaff(permissions.BasePermission):
    """Platform objects (hosts, IP pools): staff only; customers see their part elsewhere."""

    message = "staff only"

    def has_permission(self, request: Request, view: Any) -> bool:
        return _staff(request)


class StaffWritesOthersRead(permissions.BasePermission):
    """Everyone authenticated reads what the queryset shows them; staff write.

    A detail write is let through to get_object() first, so another tenant's
    object still answers 404 and only a visible one answers 403.
    """

    message = "only staff may change this"

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or _staff(request) \
            or bool(getattr(view, "detail", False))

    def has_object_permission(self, request: Request, view: Any, obj: Any) -> bool:
        return request.method in permissions.SAFE_METHODS or _staff(request)


# --- serializers ---------------------------------------------------------------------------

class VisibleRelatedField(serializers.PrimaryKeyRelatedField):  # type: ignore[type-arg]
    """A primary key among the objects the requesting user may see (`visible_to`):
    another tenant's id is refused exactly like a missing one."""

    def get_queryset(self) -> Any:
        qs = super().get_queryset()
        request = self.context.get("request")
        return qs.visible_to(request.user if request else None)


class ValidatedModelSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    """Runs the model's full_clean() on the would-be object (NetBox's pattern), so
    the rules in clean() hold for the API as for forms and the admin."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        model = self.Meta.model
        instance = copy.copy(self.instance) if self.instance is not None else model()
        for name, value in attrs.items():
            field = model._meta.get_field(name)
            if not field.many_to_many:
                setattr(instance, name, value)
        try:
            instance.full_clean()
        except DjangoValidationError as e:
            raise serializers.ValidationError(get_error_detail(e)) from e
        return attrs
