"""API routes (panel/hosting/api), under /api/v1/, and the API root listing every app's."""

from __future__ import annotations

from django.urls import path
from rest_framework import routers

from panel.guests.api.urls import router as guests_router
from panel.hosting.api import views

router = routers.SimpleRouter()
router.register("customers", views.CustomerViewSet, basename="customer")
router.register("memberships", views.MembershipViewSet, basename="membership")
router.register("plans", views.PlanViewSet, basename="plan")
router.register("hosts", views.HostViewSet, basename="host")
router.register("ip-pools", views.IPPoolViewSet, basename="ippool")
router.register("ip-addresses", views.IPAddressViewSet, basename="ipaddress")
router.register("audit-log", views.AuditLogViewSet, basename="auditlog")
router.register("tokens", views.ApiTokenViewSet, basename="apitoken")

# The browsable root of /api/v1/: the lists of both apps (nested routes are reached
# from their parent).
_LISTS = {prefix: f"{basename}-list"
          for r in (router, guests_router) for prefix, _viewset, basename in r.registry
          if "(?P<" not in prefix}

urlpatterns = [
    path("", routers.APIRootView.as_view(api_root_dict=_LISTS), name="api-root"),
    *router.urls,
]
