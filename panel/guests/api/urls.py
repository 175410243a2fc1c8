"""API routes (panel/guests/api), under /api/v1/; the API root is in panel/hosting/api/urls.py."""

from __future__ import annotations

from rest_framework import routers

from panel.guests.api import views

router = routers.SimpleRouter()
router.register("vservers", views.VServerViewSet, basename="vserver")
router.register(r"vservers/(?P<vserver_id>\d+)/ssh-keys", views.SSHKeyViewSet,
                basename="vserver-ssh-key")
router.register("operations", views.OperationViewSet, basename="operation")

urlpatterns = router.urls
